"""Data-parallel scaling: the SimCLR step (DDP, gathered negatives, LARS) at a fixed GLOBAL batch
split over 1..W ranks. ``bench_scaling`` starts each world with torchrun (gloo on the CPU); this
module is also the rank program, ``python -m benchmarks.scaling OUT ARCH SIZE GLOBAL_BATCH ITERS``,
whose rank 0 writes the median step time of the slowest rank to OUT."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def bench_scaling(worlds: list[int], arch: str, image_size: int, global_batch: int, iters: int) -> list[dict]:
    from trainer.runtime.device import check_local_ranks
    from trainer.runtime.distributed import run_ranks

    check_local_ranks(max(worlds))
    rows = []
    for world in worlds:
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        program = ["-m", "benchmarks.scaling", str(out), arch, str(image_size), str(global_batch), str(iters)]
        run_ranks(world, program, "the scaling run")
        rows.append(json.loads(out.read_text()))
        out.unlink()
    base = rows[0]["median_step_s"] * rows[0]["world"]
    for row in rows:
        row["speedup"] = base / row["median_step_s"]
        row["efficiency"] = row["speedup"] / row["world"]
    return rows


def rank_main(out: str, arch: str, image_size: int, global_batch: int, iters: int) -> None:
    from benchmarks.common import benchmark_parts, synthetic_views
    from foundation.collectives import all_reduce_
    from trainer.config import DistConfig
    from trainer.run.step import train_step
    from trainer.runtime.device import synchronize
    from trainer.runtime.distributed import init_distributed, teardown

    info = init_distributed(DistConfig(), "auto")
    parts = benchmark_parts(arch, image_size, "fp32", info)
    views = synthetic_views([(image_size, 2)], global_batch // info.world_size, info.device)
    times = []
    for i in range(2 + iters):
        start = time.perf_counter()
        train_step(parts, views, lr=0.1)  # the training step: DDP, SyncBatchNorm, gathered NT-Xent, LARS
        synchronize(info.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    # the job moves at its slowest rank (a host figure: it travels on the device under NCCL)
    median = all_reduce_(torch.tensor([statistics.median(times)]), "max")
    if info.is_main:
        Path(out).write_text(json.dumps({"world": info.world_size, "median_step_s": median.item()}))
    teardown()


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    rank_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
