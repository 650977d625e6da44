"""``simclr bench overhead``: what our training loop costs on top of the step it runs.

Each rank times, on the same model, loss and batch tensors (one real batch, handed out again and
again), in turns:

- **ours**: ``trainer.run.loop.run_training`` as a run runs it (the loader handoff, ``train_step`` with
  its skip verdict, the metrics window and its per-rank figures, the stop and folder checks, the
  progress bar, the checkpoint test, MLflow at log steps), from one batch handoff to the next;
- **bare**: a plain DDP loop: zero the gradients, forward, loss, backward, optimizer step;
- **our step**: the bare loop calling ``trainer.run.step.train_step`` instead (its agreement across
  ranks on a non-finite loss, the guarded optimizer step): what is the step's and what the loop's.

Steady-state steps only (the first ``--warmup`` of each turn are left out); the mean includes the
periodic costs (log windows), the median is a typical step. The ratio of means is the overhead
(the target is 1.10x or less, on a model small enough that overhead shows). Prints a table, writes
JSON (device, versions, commit) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

MODES = ("bare", "our step", "ours")  # a plain DDP loop; the same calling our train_step; our whole loop


class FixedBatches:
    """The run's loader, handing out one batch made once, and noting the time of each handoff."""

    def __init__(self, loader: Any, batch: tuple[list[torch.Tensor], torch.Tensor]) -> None:
        self.loader, self.batch, self.handoffs = loader, batch, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self):
        for _ in range(self.loader.steps_per_epoch):
            self.handoffs.append(time.perf_counter())
            yield self.batch


def steady(stamps: list[float], warmup: int) -> list[float]:
    """Seconds between consecutive stamps, the first ``warmup`` steps left out."""
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def time_ours(cfg: Any, info: Any, batch: tuple[list[torch.Tensor], torch.Tensor], warmup: int) -> list[float]:
    from trainer.run.loop import run_training
    from trainer.run.parts import build_parts
    from trainer.runtime.run_files import RunFolderLock

    parts = build_parts(cfg, info)
    lock = RunFolderLock(cfg.train.run_dir)  # held by rank 0, as in a run; its check at log steps is part of the loop
    if info.is_main:
        lock.acquire()
    parts.folder_lock = lock
    fixed = FixedBatches(parts.loader, batch)
    parts.loader = fixed
    try:
        run_training(parts, threading.Event())
    finally:
        lock.release()
    return steady(fixed.handoffs, warmup)


def time_bare(cfg: Any, info: Any, batch: tuple[list[torch.Tensor], torch.Tensor], warmup: int, steps: int,
              our_step: bool = False) -> list[float]:
    """The plain DDP loop; ``our_step``: the same loop calling ``trainer.run.step.train_step`` (its skip
    verdict across ranks, the guarded optimizer step), which tells the step's share from the loop's."""
    from trainer.run.grad_cache import model_input
    from trainer.run.parts import build_model_parts
    from trainer.run.step import train_step

    m = build_model_parts(cfg, info, lr=0.1)
    groups, labels = batch
    views, images = sum(g.shape[0] for g in groups), groups[0].shape[1]
    stamps = []
    for _ in range(warmup + steps + 1):
        stamps.append(time.perf_counter())
        if our_step:
            train_step(m, groups, 0.1, labels)
            continue
        m.optimizer.zero_grad(set_to_none=True)
        out = m.ddp_model(model_input(groups, False))
        loss, _ = m.loss_fn(out.projections.view(views, images, -1))
        loss.backward()
        m.optimizer.step()
    return steady(stamps, warmup)


def rank_main(args: argparse.Namespace) -> None:
    from data_pipeline import build_loader
    from trainer.config import load_config
    from trainer.runtime.distributed import init_distributed, teardown

    work = Path(args.work)
    over = [f"model.arch={args.arch}", "model.cifar_stem=true", f"data.root={args.data}", "data.backend=torchvision",
            f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "data.num_workers=0",
            "train.device=cpu", "train.epochs=1000", f"train.stop_after_steps={args.warmup + args.steps + 1}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.log_model=false",
            "tracking.system_metrics=false", "checkpoint.resume=none"]
    cfg = load_config(None, [*over, f"train.run_dir={work / 'batch'}"])
    info = init_distributed(cfg.dist, cfg.train.device)
    # one real batch of this rank, for both loops (the loader alone: no model, tracker or run folder yet)
    loader = build_loader(cfg.data, cfg.train.seed, info.rank, info.world_size, info.device)
    loader.set_epoch(0)
    groups, labels = next(iter(loader))
    batch = ([g.clone() for g in groups], labels.clone())
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):  # in turns, the order reversed every other repeat: drift hits all
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            if mode == "ours":
                run = load_config(None, [*over, f"train.run_dir={work / f'ours_{repeat}'}"])
                times[mode] += time_ours(run, info, batch, args.warmup)
            else:
                times[mode] += time_bare(cfg, info, batch, args.warmup, args.steps, our_step=mode == "our step")
    if info.is_main:
        Path(args.rank_out).write_text(json.dumps(times))
    teardown()


def summarise(times: dict[str, list[float]]) -> dict[str, Any]:
    rows = {mode: {"steps": len(values), "mean_ms": 1000 * statistics.fmean(values),
                   "median_ms": 1000 * statistics.median(values)} for mode, values in times.items()}
    for row in rows.values():
        row["mean_over_bare"] = row["mean_ms"] / rows["bare"]["mean_ms"]
    return {"rows": rows, "overhead_mean": rows["ours"]["mean_ms"] / rows["bare"]["mean_ms"],
            "overhead_median": rows["ours"]["median_ms"] / rows["bare"]["median_ms"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simclr bench overhead", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks (gloo)")
    p.add_argument("--arch", default="resnet18", help="encoder (small, so that the loop's cost shows)")
    p.add_argument("--image-size", type=int, default=16, help="crop size (px)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (images)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per turn")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each turn")
    p.add_argument("--repeats", type=int, default=2, help="turns of each loop, alternating which goes first")
    p.add_argument("--data", default=None, help="images for the batch (default: shipped photos)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/overhead_cpu_<arch>.json)")
    p.add_argument("--rank-out", help=argparse.SUPPRESS)  # a rank of the benchmark (started by it)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from trainer.config import ConfigError

    for flag, value, least in (("--nproc", args.nproc, 1), ("--steps", args.steps, 2), ("--warmup", args.warmup, 0),
                               ("--repeats", args.repeats, 1), ("--image-size", args.image_size, 8),
                               ("--batch-size", args.batch_size, 2 * args.nproc)):
        if value < least:
            raise ConfigError(f"simclr bench overhead {flag} {value}: must be at least {least}")
    if args.batch_size % args.nproc:
        raise ConfigError(f"simclr bench overhead --batch-size {args.batch_size} (global) does not divide over "
                          f"--nproc {args.nproc} ranks; use a multiple of {args.nproc}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.rank_out:
        rank_main(args)
        return {}
    from benchmarks.common import RESULTS, result_header, write_json
    from benchmarks.pipeline import fallback_data
    from trainer.runtime.device import check_local_ranks
    from trainer.runtime.distributed import run_ranks

    check_local_ranks(args.nproc)
    data = args.data or str(fallback_data(max(args.image_size, 32)))
    with tempfile.TemporaryDirectory(prefix="simclr_overhead_") as work:
        rank_out = Path(work) / "times.json"
        program = ["-m", "benchmarks.overhead", "--rank-out", str(rank_out), "--work", work, "--data", data,
                   "--arch", args.arch, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        run_ranks(args.nproc, program, "the overhead benchmark")
        times = json.loads(rank_out.read_text())
    result = {**result_header("overhead", "cpu"),
              "config": {"nproc": args.nproc, "arch": args.arch, "image_size": args.image_size,
                         "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                         "repeats": args.repeats},
              **summarise(times), "target": 1.10}
    print_result(result)
    out = write_json(result, Path(args.out) if args.out else RESULTS / f"overhead_cpu_{args.arch}.json")
    print(f"wrote {out}")
    return result


def print_result(result: dict[str, Any]) -> None:
    from benchmarks.common import print_table

    c = result["config"]
    print_table(f"our loop vs a bare DDP loop: {c['arch']} at {c['image_size']} px, global batch {c['batch_size']}, "
                f"{c['nproc']} CPU rank(s), {result['rows']['ours']['steps']} steady steps each",
                [("loop", "<9"), ("mean ms/step", ">14.1f"), ("median ms/step", ">16.1f"), ("mean / bare", ">13.3f")],
                [[mode, row["mean_ms"], row["median_ms"], row["mean_over_bare"]]
                 for mode, row in result["rows"].items()])
    verdict = "within" if result["overhead_mean"] <= result["target"] else "over"
    print(f"overhead (ours / bare): {result['overhead_mean']:.3f}x by the mean, {result['overhead_median']:.3f}x by "
          f"the median ({verdict} the {result['target']:.2f}x target)")


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main(sys.argv[1:])
