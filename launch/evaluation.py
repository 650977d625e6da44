"""``simclr eval``'s work, wherever it runs: one process, each of ``--nproc K`` local ranks, or
each task of a SLURM job (``simclr submit --eval``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foundation.logs import get_logger
from trainer.config import DEVICES
from trainer.runtime.rank_report import OPTION as REPORT_OPTION

log = get_logger()

if TYPE_CHECKING:
    from data_pipeline.sources import Source
    from trainer.evaluation.evaluate import Report


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """``simclr eval``'s options (also what ``simclr submit --eval`` passes on)."""
    p.add_argument("--checkpoint", required=True, help="a checkpoint step_N.pt or an exported encoder.pt")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks, each extracting the features of its share of both sets, one per GPU, in a "
                        "process group (--nproc 1 as well); left out: one process, no process group")
    p.add_argument("--train-data", required=True, help="labelled training set (any layout data.root accepts)")
    p.add_argument("--val-data", required=True, help="held-out set (any layout data.root accepts)")
    p.add_argument("--train-split", default="", help="split of --train-data when it holds several (STL-10: train)")
    p.add_argument("--val-split", default="", help="split of --val-data when it holds several (STL-10, CIFAR: test)")
    p.add_argument("--probe-epochs", type=int, default=100, help="epochs of the linear probe on frozen features")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when visible")
    p.add_argument("--workers", type=int, default=2, help="data loading workers / DALI threads")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init encoder")
    p.add_argument("--finetune", type=float, nargs="*", default=[], metavar="FRACTION",
                   help="also fine-tune with these fractions of the labels, e.g. 0.01 0.1 1.0")
    p.add_argument("--finetune-epochs", type=int, default=30, help="epochs of each --finetune run")
    p.add_argument("--head-layers", type=int, default=0, metavar="N",
                   help="read features after the first N layers of the projection head (SimCLRv2: fine-tune from "
                        "the head's first layer); needs a training checkpoint step_N.pt")
    p.add_argument("--tsne", action="store_true", help="write t-SNE plots of the held-out features")
    p.add_argument("--out", default=None, help="report folder (default: <checkpoint dir>/eval)")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=None,
                   help="log the figures (eval/...), the report and the plots to MLflow: into the training run the "
                        "checkpoint belongs to, else into an evaluation run of its own. Default: on, unless the run "
                        "was trained with tracking.enabled=false; --no-mlflow skips it")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="with several ranks: how long a rank waits for the others before the job ends (a dead or "
                        "stuck rank)")
    p.add_argument(REPORT_OPTION, default=None, help=argparse.SUPPRESS)  # set by the local launcher


def eval_parser() -> argparse.ArgumentParser:
    """``simclr eval``'s options alone (for a SLURM task given its arguments)."""
    p = argparse.ArgumentParser(prog="simclr eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_eval_args(p)
    return p


def eval_argv(args: argparse.Namespace) -> list[str]:
    """The command line of ``args`` for each rank (without --nproc): every option, explicitly."""
    out = ["--checkpoint", str(args.checkpoint), "--train-data", str(args.train_data), "--val-data",
           str(args.val_data), "--train-split", args.train_split, "--val-split", args.val_split,
           "--probe-epochs", str(args.probe_epochs), "--device", args.device, "--workers", str(args.workers),
           "--finetune-epochs", str(args.finetune_epochs), "--head-layers", str(args.head_layers),
           "--timeout-s", f"{args.timeout_s:g}"]
    out += ["--finetune", *map(str, args.finetune)] if args.finetune else []
    out += ["--out", str(args.out)] if args.out else []
    out += [flag for flag, on in (("--no-baseline", args.no_baseline), ("--tsne", args.tsne)) if on]
    out += [] if args.mlflow is None else ["--mlflow" if args.mlflow else "--no-mlflow"]
    return out


def _write_report(report: Any, out_dir: Path) -> None:
    """The report on the console and into ``out_dir`` (report.json, report.md), each file whole."""
    import json

    from trainer.runtime.run_files import atomic_write_text

    print("\n" + report.to_markdown())
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2))
    atomic_write_text(out_dir / "report.md", report.to_markdown())
    print(f"report: {out_dir / 'report.json'}, {out_dir / 'report.md'}")
    if report.neighbours:
        print(f"nearest neighbours (8 queries, each beside its 8 nearest training images): {report.neighbours}")


def run_evaluation(args: argparse.Namespace) -> dict | None:
    """The evaluation of ``args`` in this process, which is one rank when WORLD_SIZE says so: every
    rank extracts features of its share of each set, the shares are gathered, and rank 0 (which
    alone fine-tunes and draws) writes the report once, whole (a requeued job just runs again).
    Returns the report on rank 0."""
    import dataclasses

    import torch

    from data_pipeline import IndexStore, open_source
    from trainer.config import DistConfig
    from trainer.evaluation.encoder_loading import load_encoder, random_init_like
    from trainer.evaluation.evaluate import check_same_classes, compare
    from trainer.runtime.distributed import init_distributed, teardown

    encoder, cfg = load_encoder(args.checkpoint, args.head_layers)
    data_cfg = dataclasses.replace(cfg.data, num_workers=args.workers)
    info = init_distributed(DistConfig(timeout_s=args.timeout_s), args.device, launched=args.report_to is not None)
    try:
        # rank 0 lists the image trees (reusing the training run's index beside the checkpoint) and
        # hands them to the other ranks
        where = Path(args.checkpoint).resolve().parent
        run_folder = where.parent if where.name == "checkpoints" else where  # step_N.pt or encoder.pt
        store = IndexStore(run_folder, info.rank, info.world_size)
        train_set = open_source(args.train_data, args.train_split, cfg.data.labels, store)
        val_set = open_source(args.val_data, args.val_split, cfg.data.labels, store)
        check_same_classes(train_set, val_set)
        same_data = [Path(args.train_data).resolve(), args.train_split] == [Path(args.val_data).resolve(),
                                                                            args.val_split]
        notes = misleading_settings(train_set, same_data, args.probe_epochs, tuple(args.finetune), args.finetune_epochs)
        if info.is_main:
            for note in notes:
                log.warning(note)
        device = info.device
        out_dir = Path(args.out or Path(args.checkpoint).parent / "eval")
        torch.manual_seed(cfg.train.seed)
        encoders = {"SimCLR": encoder}
        if not args.no_baseline:
            encoders["random init"] = random_init_like(cfg, args.head_layers)
        report = compare(encoders, train_set, val_set, data_cfg, device, args.probe_epochs,
                         shard=(info.rank, info.world_size), finetune_fractions=tuple(args.finetune),
                         finetune_epochs=args.finetune_epochs, tsne_dir=out_dir if args.tsne else None,
                         neighbours_out=out_dir / "neighbours.png")
        if report is None:  # not rank 0
            return None
        report.meta = {"checkpoint": str(args.checkpoint), "head_layers": args.head_layers,
                       "train_data": str(args.train_data), "val_data": str(args.val_data),
                       "train_split": args.train_split, "val_split": args.val_split,
                       "arch": cfg.model.arch, "device": str(device), "ranks": info.world_size,
                       "neighbours": str(report.neighbours) if report.neighbours else None, "notes": notes}
        _write_report(report, out_dir)
        if args.mlflow or (args.mlflow is None and cfg.tracking.enabled):
            _log_eval_to_mlflow(report, out_dir, args.checkpoint, cfg)
        elif args.mlflow is None:
            log.info("not logged to MLflow (the run was trained with tracking.enabled=false); pass "
                     "--mlflow to log this evaluation")
        return report.to_dict()
    finally:
        teardown()


def eval_metric_names(report: Report) -> dict[str, float]:
    """The report's figures as MLflow metrics in the ``eval`` chart group: the evaluated encoder's as
    ``eval/<score>`` (what the runs table of a sweep compares), the others' as ``eval/<row>_<score>``."""
    out = {}
    for name, row in report.rows.items():
        prefix = "eval/" if name == "SimCLR" else f"eval/{name.replace(' ', '_')}_"
        out.update({f"{prefix}{k}": row[k] for k in report.scores() if k in row})
    return out


def _log_eval_to_mlflow(report: Report, out_dir: Path, checkpoint: str, cfg) -> None:
    """Into the training run when the checkpoint's folder names one, else into an evaluation run of
    its own in '<experiment>-eval', tagged with the checkpoint's path. A store that cannot be reached
    costs one warning: the report on disk is the evaluation."""
    import dataclasses
    import time

    from trainer.tracking import MlflowRun, run_id_of

    path = Path(checkpoint).resolve()
    # checkpoints/step_N.pt or encoder.pt: both belong to the run whose folder holds them
    run_id = run_id_of(path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    tracking = cfg.tracking
    if run_id is None:
        tracking = dataclasses.replace(tracking, experiment=f"{tracking.experiment}-eval")
    run = MlflowRun(dataclasses.replace(tracking, system_metrics=False), source="simclr eval", retry_s=0.0,
                    goes_on=f"the evaluation is not logged there; its report is in {out_dir}", reopens=False)
    tags = {"simclr.eval": "1", "simclr.checkpoint": str(path)}
    run.start({"eval.checkpoint": str(path)} if run_id is None else {}, tags, run_id=run_id)
    if not run.flush(force=True):  # the store did not answer: said once, by the run
        return
    run.log_metrics(eval_metric_names(report), step=0, time_ms=int(time.time() * 1000))
    for file in sorted(out_dir.glob("*.png")) + [out_dir / "report.json", out_dir / "report.md"]:
        run.log_artifact(file, "eval")
    if run_id is None:
        run.finish()
    else:  # the training run keeps the status its training ended with
        run.finish(None)
    print(f"logged to {run.describe()}")


def misleading_settings(train: Source, same_data: bool, probe_epochs: int,
                        finetune_fractions: tuple[float, ...], finetune_epochs: int) -> list[str]:
    """Notes for settings that make a report's numbers mean something else than they seem (said on
    the console and kept in the report)."""
    import numpy as np

    notes = []
    if same_data:
        notes.append("the held-out set is the training set: the scores measure fitting, not generalisation; give "
                     "--val-data a held-out split")
    if probe_epochs == 0:
        notes.append("--probe-epochs 0: the linear probe is not trained, so linear_top1/top5 are those of a random "
                     "linear layer")
    if finetune_fractions and finetune_epochs == 0:
        notes.append("--finetune-epochs 0: nothing is fine-tuned, so the finetune_* scores are those of an untrained "
                     "head")
    per_class = np.bincount(np.asarray(train.labels)[np.asarray(train.labels) >= 0])
    for fraction in finetune_fractions:
        floored = int(sum(round(fraction * n) < 1 for n in per_class if n))
        if floored:
            notes.append(f"--finetune {fraction:g}: {fraction:g} of the labels rounds to no image in {floored} of "
                         f"{len(per_class)} classes, so each of those keeps 1 image (a 1-image-per-class fine-tune, "
                         "not the fraction asked for)")
    return notes
