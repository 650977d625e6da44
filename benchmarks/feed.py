"""Feed benchmark: does the data pipeline keep the training step busy?

Runs the real training step (``trainer.run.step.train_step`` on the parts ``build_parts`` makes from a
config) for N steps on K ranks, in three modes:

- ``e2e``: end to end, batches from the configured loader (DALI or torchvision);
- ``model``: the model alone, on one batch already on the device;
- ``loader``: the loader alone, every rank's pipeline running at once.

It reports views/s, the share of wall time spent waiting for data (the maximum over ranks), the
stall at each epoch boundary (the wait for an epoch's first batch beyond the median wait, also in
steps), host syncs per step and peak memory. ``--rebuild-each-epoch`` releases the DALI pipeline
at every epoch boundary: the behaviour before one pipeline per run, for the before/after stall.

    python -m benchmarks.feed --config configs/cifar10_resnet18.yaml data.root=/data/cifar10-jpeg/train
    python -m benchmarks.feed --nproc 2 --steps 20 --modes loader ...     # K ranks under torchrun
    simclr bench feed ...                                                  # the same

Writes JSON (device, versions, commit) under benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

MODES = ("e2e", "model", "loader")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simclr bench feed", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="a recipe (YAML); default: the embedded defaults")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for simclr train")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node, under torchrun (default 1)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="default: all three")
    p.add_argument("--rebuild-each-epoch", action="store_true",
                   help="DALI: a new pipeline at every epoch boundary (the old behaviour, for comparison)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/feed_<device>_<...>.json)")
    p.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)  # a rank's own result (under torchrun)
    args = p.parse_intermixed_args(argv)
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--nproc", args.nproc, 1)):
        if value < least:
            from trainer.config import ConfigError

            raise ConfigError(f"{flag} {value}: must be at least {least}")
    return args


def batches_forever(loader, start_epoch: int = 0, rebuild_each_epoch: bool = False):
    """(epoch, step in epoch, batch) from the loader, epoch after epoch."""
    epoch = start_epoch
    while True:
        if rebuild_each_epoch:
            loader.close()
        loader.set_epoch(epoch)
        for step, batch in enumerate(loader):
            yield epoch, step, batch
        epoch += 1


def run_mode(mode: str, parts, source, steps: int, warmup: int) -> dict:
    """One mode on this rank, its batches drawn from ``source`` (one ``batches_forever`` for every
    mode: one pipeline runs across them): per-step waits for data, wall time, syncs, peak memory."""
    from trainer.observe.device_syncs import DeviceSyncCounter
    from trainer.run.step import train_step
    from trainer.runtime.device import memory_in_use_mb, peak_memory_mb, synchronize

    device = parts.info.device
    counter = DeviceSyncCounter(device)
    fixed = None
    if mode == "model":
        _, _, (groups, labels) = next(source)
        fixed = ([g.clone() for g in groups], labels.clone())
    waits, firsts, lr = [], [], parts.schedule(parts.schedule.total // 2)  # a mid-schedule lr
    traces: list[str] = []  # train.profile.steps: the end-to-end mode's steps, as in training
    warmup_start = start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        t = time.perf_counter()
        if fixed is None:  # the loader's own host work is not the step's: not counted
            _, step, (groups, labels) = next(source)
        else:
            groups, labels = fixed
            step = -1
        waited = time.perf_counter() - t
        if i >= warmup:
            (firsts if step == 0 else waits).append(waited)
        if mode == "e2e":
            parts.profiler.before_step(i)
        if mode != "loader":
            with counter.counting() if i >= warmup else contextlib.nullcontext():
                train_step(parts, groups, lr, labels)  # with the online probe when the run has one
        if mode == "e2e":
            traces += [str(f) for f in parts.profiler.after_step(i + 1)]
    synchronize(device)
    elapsed = time.perf_counter() - start
    probe_share = online_probe_share(parts, fixed, lr, steps) if mode == "model" else None
    views = parts.loader.views.count * parts.cfg.data.batch_size * steps  # global: every rank runs as many steps
    median_wait = statistics.median(waits) if waits else 0.0
    # warm-up (torch.compile's compilation, cuDNN autotuning, the pipeline's start) apart from steady state
    return {"mode": mode, "profile": traces, "steps": steps, "warmup_steps": warmup, "warmup_s": start - warmup_start,
            "elapsed_s": elapsed, "views_per_s": views / elapsed,
            "step_s": elapsed / steps, "data_wait_share": (sum(waits) + sum(firsts)) / elapsed,
            "epoch_boundaries": len(firsts),
            "epoch_stall_s": max((f - median_wait for f in firsts), default=None),
            # CUDA's own count (sync debug mode); None on the CPU, where the host is the device
            "host_syncs_per_step": None if counter.total is None else counter.total / steps,
            "online_probe_share": probe_share,
            "peak_memory_mb": peak_memory_mb(device), **memory_in_use_mb(device)}


def online_probe_share(parts, batch, lr: float, steps: int) -> float | None:
    """The online probe's cost as a share of the training step: its update (on features of the
    batch's size) timed against the step without it, interleaved round by round so that the
    machine's drift falls on both (on a busy CPU the difference of two whole steps is all noise)."""
    probe = getattr(parts, "online_probe", None)
    if probe is None or batch is None:
        return None
    from benchmarks.common import timed_interleaved
    from trainer.run.step import train_step

    groups, labels = batch
    features = torch.randn(len(labels), parts.model.feature_dim, device=labels.device)
    keep = torch.zeros((), device=labels.device)
    times = timed_interleaved({"step": lambda: train_step(parts, groups, lr),
                               "probe": lambda: probe.update(features, labels, keep)}, parts.info.device, 1, steps)
    probe.epoch_top1()  # forget the counts of these timing calls
    return statistics.median(times["probe"]) / statistics.median(times["step"])


def rank_main(args: argparse.Namespace, on_mode: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every mode on this rank (the loader and model are built once, as in a training run);
    ``on_mode(rows so far)`` after each mode (a capped run keeps what finished)."""
    from trainer.config import load_config
    from trainer.run.parts import build_parts
    from trainer.runtime.distributed import init_distributed, teardown

    run_dir = tempfile.mkdtemp(prefix="simclr_feed_")
    cfg = load_config(args.config, [*args.overrides, "tracking.enabled=false", f"train.run_dir={run_dir}"])
    info = init_distributed(cfg.dist, cfg.train.device, run_dir=Path(run_dir))
    parts = None
    try:
        parts = build_parts(cfg, info)
        parts.model.train()
        source = batches_forever(parts.loader, rebuild_each_epoch=args.rebuild_each_epoch)
        rows = []
        for mode in args.modes:
            row = run_mode(mode, parts, source, args.steps, args.warmup)
            row.update(rank=info.rank, backend=type(parts.loader).__name__, steps_per_epoch=parts.steps_per_epoch,
                       pipelines_built=getattr(parts.loader, "pipelines_built", None), **decoder_memory(parts),
                       store_retries=parts.loader.store_retries,  # object storage (data.root=s3://...)
                       read_ahead_peak_mb=parts.loader.source.read_ahead_peak_bytes / 2**20)
            rows.append(row)
            if on_mode is not None:
                on_mode(rows)
        if args.rank_out:
            Path(f"{args.rank_out}.rank{info.rank}").write_text(json.dumps(rows))
        return rows
    finally:
        if parts is not None:
            parts.loader.close()  # DALI's pipeline shut down here, not in its clean-up at exit
        teardown()


def decoder_memory(parts) -> dict:
    """DALI's nvJPEG buffers as sized for this dataset (planned: they are allocated by DALI, not
    torch), where the GPU decoder runs."""
    sizing = getattr(parts.loader, "decoder_sizing", None)
    if sizing is None:
        return {"decoder_sizing": None}
    planned = sizing.planned_mb(max(1, parts.cfg.data.num_workers))
    return {"decoder_sizing": {"max_image": [sizing.max_width, sizing.max_height],
                               "device_padding": sizing.device_padding, "host_padding": sizing.host_padding,
                               "planned_device_mb": planned["device"], "planned_pinned_mb": planned["pinned"]}}


def combine(per_rank: list[list[dict]]) -> list[dict]:
    """One row per mode: the job moves at its slowest rank, and the data wait is the worst rank's."""
    rows = []
    for mode_rows in zip(*per_rank):
        worst = max(mode_rows, key=lambda r: r["elapsed_s"])
        stalls = [r["epoch_stall_s"] for r in mode_rows if r["epoch_stall_s"] is not None]
        rows.append({**worst, "ranks": len(mode_rows),
                     "data_wait_share": max(r["data_wait_share"] for r in mode_rows),
                     "epoch_stall_s": max(stalls) if stalls else None,
                     "host_syncs_per_step": None if worst["host_syncs_per_step"] is None else
                     max(r["host_syncs_per_step"] for r in mode_rows),
                     "peak_memory_mb": max(r["peak_memory_mb"] for r in mode_rows),
                     "device_in_use_mb": max((r["device_in_use_mb"] or 0) for r in mode_rows) or None,
                     "host_pinned_mb": max((r["host_pinned_mb"] or 0) for r in mode_rows) or None,
                     "store_retries": sum(r.get("store_retries", 0) for r in mode_rows),
                     "read_ahead_peak_mb": max(r.get("read_ahead_peak_mb", 0.0) for r in mode_rows)})
    step_s = next((r["step_s"] for r in rows if r["mode"] == "e2e"), None)
    model = next((r for r in rows if r["mode"] == "model"), None)
    for r in rows:
        base = step_s or r["step_s"]  # a training step's time where e2e ran, else this mode's own step
        r["epoch_stall_steps"] = None if r["epoch_stall_s"] is None else r["epoch_stall_s"] / base
        if model is not None:
            r["views_per_s_over_model"] = r["views_per_s"] / model["views_per_s"]
    return rows


def rank_rows(args: argparse.Namespace) -> list[list[dict]]:
    from trainer.runtime.distributed import run_ranks

    rank_out = Path(tempfile.mkdtemp(prefix="simclr_feed_ranks_")) / "rows"
    program = ["-m", "benchmarks.feed", *(["--config", args.config] if args.config else []), *args.overrides,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--modes", *args.modes,
               *(["--rebuild-each-epoch"] if args.rebuild_each_epoch else []), "--rank-out", str(rank_out)]
    run_ranks(args.nproc, program, "the feed benchmark")
    return [json.loads(Path(f"{rank_out}.rank{r}").read_text()) for r in range(args.nproc)]


def main(argv: list[str] | None = None) -> dict:
    from trainer.config import load_config

    args = parse_args(argv)
    if args.rank_out:  # one rank of a torchrun job
        rank_main(args)
        return {}
    cfg = load_config(args.config, args.overrides)  # validated before any rank starts
    from trainer.runtime.device import choose_device

    device = choose_device(cfg.train.device)
    if args.nproc > 1:
        from trainer.runtime.device import check_local_ranks

        check_local_ranks(args.nproc, cfg.train.device, cfg.dist.backend)
        per_rank = rank_rows(args)
    else:  # each mode's row written and printed as it finishes: a stage capped mid-way keeps them
        per_rank = [rank_main(args, on_mode=lambda rows: save(args, cfg, device, [rows], partial=True))]
    return save(args, cfg, device, per_rank)


def save(args: argparse.Namespace, cfg, device: torch.device, per_rank: list[list[dict]],
         partial: bool = False) -> dict:
    """The result of the modes run so far: JSON written (``partial`` while modes remain), the last
    mode's row printed when partial, the whole table at the end."""
    from benchmarks.common import RESULTS, device_name, keep_traces, result_header, write_json
    from data_pipeline.views import view_spec

    rows = combine(per_rank)
    result = {**result_header("feed", device_name(device)),
              "config": {"config": args.config, "overrides": args.overrides, "arch": cfg.model.arch,
                         "image_size": cfg.data.image_size, "views": view_spec(cfg.data).describe(),
                         "global_batch": cfg.data.batch_size,
                         "precision": cfg.precision.dtype, "ranks": args.nproc, "steps": args.steps,
                         "warmup": args.warmup, "data": cfg.data.root, "backend": rows[0]["backend"],
                         "rebuild_each_epoch": args.rebuild_each_epoch, "compile": cfg.model.compile,
                         "online_probe": cfg.train.online_probe},
              "rows": rows, "partial": partial}
    if partial:
        r = rows[-1]
        print(f"[feed] {r['mode']}: {r['views_per_s']:.1f} views/s, data wait {100 * r['data_wait_share']:.1f}%, "
              f"warm-up {r['warmup_s']:.1f} s", flush=True)
    else:
        print_table(result)
    name = (f"feed_{device.type}_{cfg.model.arch}_{cfg.data.image_size}px_b{cfg.data.batch_size}_"
            f"{rows[0]['backend'].replace('Loader', '').lower()}{'_rebuild' if args.rebuild_each_epoch else ''}")
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    # the e2e mode's traces (train.profile.steps), from the ranks' temporary run folders to beside the result
    result["profile"] = [] if partial else keep_traces(
        [f for rank_rows in per_rank for row in rank_rows for f in row.get("profile", [])], out)
    write_json(result, out)
    if partial:
        return result
    print(f"wrote {out}")
    if result["profile"]:
        print(f"profile (train.profile.steps of the e2e mode): {Path(result['profile'][0]).parent}")
    return result


def print_table(result: dict) -> None:
    c = result["config"]
    print(f"\n== feed: {c['arch']} {c['image_size']}px, global batch {c['global_batch']}, {c['precision']}, "
          f"{c['ranks']} rank(s), {c['backend']} on {result['device']}")
    print(f"{'mode':<8}{'views/s':>10}{'x model':>9}{'data wait':>11}{'epoch stall':>13}{'(steps)':>9}"
          f"{'syncs/step':>12}{'peak MB':>9}")
    probe = next((r["online_probe_share"] for r in result["rows"] if r.get("online_probe_share") is not None), None)
    for r in result["rows"]:
        stall = "-" if r["epoch_stall_s"] is None else f"{1e3 * r['epoch_stall_s']:.0f} ms"
        steps = "-" if r["epoch_stall_steps"] is None else f"{r['epoch_stall_steps']:.2f}"
        ratio = f"{r['views_per_s_over_model']:.2f}" if "views_per_s_over_model" in r else "-"
        syncs = "-" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:.2f}"
        print(f"{r['mode']:<8}{r['views_per_s']:>10.1f}{ratio:>9}{100 * r['data_wait_share']:>10.1f}%{stall:>13}"
              f"{steps:>9}{syncs:>12}{r['peak_memory_mb']:>9.0f}")
    last = result["rows"][-1]
    sizing = last.get("decoder_sizing")
    if sizing:
        print(f"DALI decoder: images up to {sizing['max_image'][0]}x{sizing['max_image'][1]}, buffers planned "
              f"{sizing['planned_device_mb']:.0f} MB device, {sizing['planned_pinned_mb']:.0f} MB pinned")
    if last.get("device_in_use_mb"):
        print(f"device memory in use: {last['device_in_use_mb']:.0f} MB (torch peak {last['peak_memory_mb']:.0f} MB)")
    if last.get("pipelines_built") is not None:
        print(f"DALI pipelines built: {last['pipelines_built']} (one across every mode)")
    if probe is not None:
        print(f"online probe: {100 * probe:.2f}% of the model step (its update timed against the step, interleaved)")


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
