"""Data-pipeline benchmark: two-view SimCLR augmentation throughput, DALI vs torchvision DataLoader.

Same images, same augmentation parameters, DALI threads = DataLoader workers = cores. Give the
image folders to read (e.g. ImageNette at 224 px, CIFAR-10 JPEGs at 32 px); without them, JPEG
crops of the photos shipped with scikit-image/scikit-learn are written at the needed size. Prints a
table and writes JSON under benchmarks/results/.

    python -m benchmarks.pipeline [--data224 DIR] [--data32 DIR] [--batches 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, device_name, print_table, result_header, write_json
from data_pipeline import build_loader
from data_pipeline.config import AugmentConfig, DataConfig
from trainer.config import DEVICES
from trainer.runtime.device import choose_device, synchronize


def fallback_data(size: int) -> Path:
    from data_pipeline.sample_data import make_photo_crops, write_image_folder

    root = Path(tempfile.mkdtemp(prefix=f"simclr_bench_{size}_"))
    x, y, classes = make_photo_crops(size=size, train_per_class=60, val_per_class=1)["train"]
    return write_image_folder(root / "train", x, y, classes)


def data_folder(given: str | None, size: int) -> Path:
    """The image folder given on the command line (which must exist), or photo crops of ``size`` px."""
    if given is None:
        return fallback_data(size)
    if not Path(given).is_dir():
        raise SystemExit(f"{given} is not a folder of images; pass an image folder, or leave the option out to "
                         "benchmark on photo crops")
    return Path(given)


def images_per_s(root: Path, backend: str, size: int, batch: int, workers: int, batches: int,
                 device: torch.device) -> float:
    aug = AugmentConfig(blur_prob=0.5 if size > 64 else 0.0, jitter_strength=1.0 if size > 64 else 0.5)
    cfg = DataConfig(root=str(root), backend=backend, image_size=size, batch_size=batch, num_workers=workers,
                     augment=aug)
    loader = build_loader(cfg, seed=0, rank=0, world_size=1, device=device)
    warmup = 3  # worker start, pipeline build, first decode
    n = min(batches, loader.steps_per_epoch - warmup)
    if n < 1:
        raise ValueError(f"{root} gives {loader.steps_per_epoch} batches of {batch} images per epoch: too few to time "
                         f"any after {warmup} warm-up batches; use a batch of at most "
                         f"{len(loader.source) // (warmup + 1)} or a folder with more images")
    loader.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    synchronize(device)
    return n * batch / (time.perf_counter() - t)


def compare_loaders(root: Path, image_size: int, batch: int, workers: int, batches: int,
                    device: torch.device) -> dict:
    """Images/s (two views) of each backend on the same images; a backend that cannot run here
    (DALI not installed) is reported as None with its error."""
    row: dict = {"image_size": image_size, "batch": batch, "data": str(root), "workers": workers}
    for backend in ("dali", "torchvision"):
        try:
            row[backend] = images_per_s(root, backend, image_size, batch, workers, batches, device)
        except Exception as exc:
            row[backend], row[f"{backend}_error"] = None, (str(exc).splitlines() or [type(exc).__name__])[0]
    if row["dali"] and row["torchvision"]:
        row["dali_over_torchvision"] = row["dali"] / row["torchvision"]
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--data224", default=None, help="an image folder read at 224 px (default: photo crops)")
    p.add_argument("--data32", default=None, help="an image folder read at 32 px (default: photo crops)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", choices=DEVICES, help="auto: CUDA when visible")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = choose_device(args.device)
    rows = []
    for size, root, batch in ((224, args.data224, 64), (32, args.data32, 256)):
        root = data_folder(root, 256 if size == 224 else 32)
        rows.append(compare_loaders(root, size, batch, args.workers, args.batches, device))
    label = device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()} cores (DALI CPU mode)"
    result = {**result_header("pipeline", label), "rows": rows}
    print_table(f"two-view SimCLR augmentation throughput on {result['device']}",
                [("px", ">5"), ("batch", ">7"), ("DALI img/s", ">12.1f"), ("torchvision img/s", ">19.1f"),
                 ("ratio", ">8.2f")],
                [[r["image_size"], r["batch"], r["dali"], r["torchvision"], r.get("dali_over_torchvision")]
                 for r in rows])
    out = write_json(result, Path(args.out) if args.out else RESULTS / f"pipeline_{device.type}.json")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
