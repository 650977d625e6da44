"""Folder of JPEGs vs tar shards: start-up cost (listing + file check) and two-view images/s.

What a job pays before its first step, and again at every requeue: listing every file and, for
the DALI backend, checking every file (DALI's decoder can bring the process down on a corrupt one).
Three starts are timed for each layout: a folder's first start, its restart (the file checks kept
in the run folder's cache, keyed by path, size and mtime), and a shard set's start (the manifest
and one index per shard; make-shards checked the images once). The page cache is warm for all of
them: on a shared file system every stat and open costs a round trip, so the folder's figures are
a floor. Then images/s of each backend on each layout.

    python -m benchmarks.data_formats [--data /data/cifar10-jpeg/train] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, print_table, result_header, write_json
from benchmarks.pipeline import data_folder
from data_pipeline import build_loader, open_source
from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.shards import make_shards

CPU = torch.device("cpu")


def data_cfg(root: Path, backend: str, batch: int, workers: int) -> DataConfig:
    return DataConfig(root=str(root), backend=backend, image_size=32, batch_size=batch, num_workers=workers,
                      augment=AugmentConfig(blur_prob=0.0, jitter_strength=0.5))


def start_up(root: Path, index_folder: Path | None, batch: int, workers: int) -> dict[str, float]:
    """Seconds to list the dataset and to build a DALI loader on it (which checks a folder's files);
    ``index_folder`` keeps the listing and the checks, as a run folder does."""
    from data_pipeline import IndexStore
    from data_pipeline.dali import DaliLoader

    t0 = time.perf_counter()
    source = open_source(root, store=IndexStore(index_folder))
    t1 = time.perf_counter()
    DaliLoader(source, data_cfg(root, "dali", batch, workers), 0, 0, 1, CPU).check_files()
    t2 = time.perf_counter()
    return {"listing_s": t1 - t0, "check_s": t2 - t1, "total_s": t2 - t0,
            "files": source.file_count}


def images_per_s(root: Path, backend: str, batch: int, workers: int, batches: int) -> float:
    loader = build_loader(data_cfg(root, backend, batch, workers), 0, 0, 1, CPU)
    loader.set_epoch(0)
    it = iter(loader)
    for _ in range(3):  # warm-up: workers or pipeline start, first decodes
        next(it)
    n = min(batches, loader.steps_per_epoch - 3)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t)


def ratio(startup: dict, name: str) -> float:
    return startup[name]["total_s"] / startup["folder_first_start"]["total_s"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.data_formats", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="an image folder of JPEGs (default: 32 px photo crops)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="start-up timings per layout (median reported)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    folder = data_folder(args.data, 32)
    work = Path(tempfile.mkdtemp(prefix="simclr_formats_"))
    try:
        t = time.perf_counter()
        manifest = make_shards(open_source(folder), work / "shards", args.shard_size)
        shard_s = time.perf_counter() - t
        cache = work / "run"  # the index folder, as a run folder holds it
        timings: dict[str, list[dict]] = {"folder_first_start": [], "folder_restart": [], "shards_start": []}
        for _ in range(args.rounds):  # interleaved in a shuffled order: this machine's noise hits all alike
            starts = list(timings)
            random.shuffle(starts)
            for name in starts:
                if name == "folder_first_start":
                    shutil.rmtree(cache, ignore_errors=True)
                    timings[name].append(start_up(folder, cache, args.batch, args.workers))
                elif name == "folder_restart":
                    if not any(cache.glob("tree_index-*")):
                        start_up(folder, cache, args.batch, args.workers)  # fill the cache first
                    timings[name].append(start_up(folder, cache, args.batch, args.workers))
                else:
                    timings[name].append(start_up(work / "shards", None, args.batch, args.workers))
        startup = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                   for name, rows in timings.items()}
        throughput = {f"{layout}_{backend}": images_per_s(root, backend, args.batch, args.workers, args.batches)
                      for layout, root in (("folder", folder), ("shards", work / "shards"))
                      for backend in ("dali", "torchvision")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {**result_header("data_formats", f"CPU x{os.cpu_count()} cores (DALI CPU mode)"),
              "data": str(folder), "images": manifest["samples"], "shard_size": args.shard_size,
              "shards": len(manifest["shards"]), "make_shards_s": shard_s, "batch": args.batch,
              "workers": args.workers, "page_cache": "warm", "start_up": startup, "images_per_s": throughput,
              "restart_over_first_start": ratio(startup, "folder_restart"),
              "shards_over_folder_first_start": ratio(startup, "shards_start")}
    print_table(f"start-up of {manifest['samples']} images ({result['device']}, warm page cache; median of "
                f"{args.rounds})",
                [("layout", "<22"), ("files", ">8.0f"), ("listing s", ">11.3f"), ("check s", ">10.3f"),
                 ("total s", ">10.3f")],
                [[name, row["files"], row["listing_s"], row["check_s"], row["total_s"]]
                 for name, row in startup.items()])
    print(f"(make-shards, once: {shard_s:.1f} s for {len(manifest['shards'])} shards)")
    print_table(f"two-view images/s at 32 px, batch {args.batch}, {args.workers} workers",
                [("layout", "<22"), ("images/s", ">10.1f")], throughput.items())
    out = write_json(result, Path(args.out) if args.out else RESULTS / "data_formats_cpu.json")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
