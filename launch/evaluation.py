"""``simclr eval``'s work, wherever it runs: one process, each of ``--nproc K`` local ranks, or
each task of a SLURM job (``simclr submit --eval``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.config import DEVICES


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """``simclr eval``'s options (also what ``simclr submit --eval`` passes on)."""
    p.add_argument("--checkpoint", required=True, help="a checkpoint step_N.pt or an exported encoder.pt")
    p.add_argument("--nproc", type=int, default=1,
                   help="local ranks: each extracts the features of its share of both sets (one per GPU)")
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
    p.add_argument("--mlflow", action="store_true", help="log the report, plots and metrics to MLflow")


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
           "--finetune-epochs", str(args.finetune_epochs), "--head-layers", str(args.head_layers)]
    out += ["--finetune", *map(str, args.finetune)] if args.finetune else []
    out += ["--out", str(args.out)] if args.out else []
    out += [flag for flag, on in (("--no-baseline", args.no_baseline), ("--tsne", args.tsne),
                                  ("--mlflow", args.mlflow)) if on]
    return out


def run_evaluation(args: argparse.Namespace) -> dict | None:
    """The evaluation of ``args`` in this process, which is one rank when WORLD_SIZE says so: every
    rank extracts features of its share of each set, the shares are gathered, and rank 0 (which
    alone fine-tunes and draws) writes the report once, whole (a requeued job just runs again).
    Returns the report on rank 0."""
    import dataclasses
    import json

    import torch

    from data_pipeline import open_source
    from trainer.config import DistConfig
    from trainer.distributed import init_distributed, teardown
    from trainer.evaluate import check_same_classes, evaluate_encoder, finetune, load_encoder, random_init_like
    from trainer.plots import tsne_plot
    from trainer.run_files import atomic_write_text

    encoder, cfg = load_encoder(args.checkpoint, args.head_layers)
    data_cfg = dataclasses.replace(cfg.data, num_workers=args.workers)
    train_set = open_source(args.train_data, args.train_split, cfg.data.labels)
    val_set = open_source(args.val_data, args.val_split, cfg.data.labels)
    check_same_classes(train_set, val_set)
    info = init_distributed(DistConfig(), args.device)
    try:
        device = info.device
        out_dir = Path(args.out or Path(args.checkpoint).parent / "eval")
        torch.manual_seed(cfg.train.seed)
        encoders = {"SimCLR": encoder}
        if not args.no_baseline:
            encoders["random init"] = random_init_like(cfg, args.head_layers)
        report: dict = {"checkpoint": str(args.checkpoint), "head_layers": args.head_layers,
                        "train_data": str(args.train_data), "val_data": str(args.val_data),
                        "train_split": args.train_split, "val_split": args.val_split,
                        "arch": cfg.model.arch, "device": str(device), "ranks": info.world_size, "rows": {}}
        for name, candidate in encoders.items():
            scores = evaluate_encoder(candidate, train_set, val_set, data_cfg, device, args.probe_epochs,
                                      shard=(info.rank, info.world_size))
            if not info.is_main:
                continue
            row = {"linear_top1": scores.linear_top1, "linear_top5": scores.linear_top5, "knn_top1": scores.knn_top1}
            for fraction in args.finetune:  # on rank 0: a fine-tuning run of its own
                tuned = finetune(candidate, train_set, val_set, data_cfg, device, fraction, args.finetune_epochs)
                row[f"finetune_{fraction:g}_top1"] = tuned["top1"]
            if args.tsne:
                out_dir.mkdir(parents=True, exist_ok=True)
                slug = name.replace(" ", "_").lower()
                plot = tsne_plot(scores.val_features, scores.val_labels, out_dir / f"tsne_{slug}.png",
                                 f"t-SNE of {name} features", class_names=val_set.classes)
                row["tsne"] = str(plot)
            report["rows"][name] = row
        if not info.is_main:
            return None
        keys = [k for k in next(iter(report["rows"].values())) if k != "tsne"]
        lines = ["| encoder | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
                  for name, r in report["rows"].items()]
        print("\n" + "\n".join(lines))
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
        atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
        print(f"\nreport: {out_dir / 'report.json'}, {out_dir / 'report.md'}")
        if args.mlflow:
            _log_eval_to_mlflow(report, out_dir, args.checkpoint, cfg)
        return report
    finally:
        teardown()


def _log_eval_to_mlflow(report: dict, out_dir: Path, checkpoint: str, cfg) -> None:
    """Into the training run when the checkpoint names one, else a new run in '<experiment>-eval'."""
    import dataclasses

    from trainer.tracking import Tracker, run_id_of

    path = Path(checkpoint).resolve()
    # checkpoints/step_N.pt or encoder.pt: both belong to the run whose folder holds them
    run_id = run_id_of(path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    tracking = cfg.tracking
    if run_id is None:
        tracking = dataclasses.replace(tracking, experiment=f"{tracking.experiment}-eval")
    tracker = Tracker(tracking, out_dir, active=True)
    tracker.start({"eval.checkpoint": checkpoint}, {"simclr.eval": "1"}, run_id=run_id)
    metrics = {f"eval.{name.replace(' ', '_')}.{k}": v for name, row in report["rows"].items()
               for k, v in row.items() if k != "tsne"}
    tracker.log_metrics(metrics, step=0)
    for file in sorted(out_dir.glob("*.png")) + [out_dir / "report.json", out_dir / "report.md"]:
        tracker.log_artifact(file, "eval")
    tracker.finish()
    print(f"logged to {tracker.describe()}")
