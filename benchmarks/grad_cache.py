"""Gradient caching (``train.micro_batch``): peak memory and images/s against the global batch, at a
fixed micro-batch, beside the plain single pass (which stops where it no longer fits).

Each point runs in a fresh process (a process's peak RSS never goes down), two training steps
(forward, gathered NT-Xent, backward, LARS), the second one timed. On a GPU the peak is the largest
allocated CUDA memory; on the CPU the peak RSS, under an address-space limit so that a plain step
too large for the machine fails instead of swapping.

    python -m benchmarks.grad_cache                                   # CPU: ResNet-18, 32 px
    python -m benchmarks.grad_cache --arch resnet50 --image-size 224 --precision bf16 --micro 128   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, device_name, encoder_arch, print_table, result_header, write_json
from trainer.config import DEVICES


def measure_point(arch: str, image_size: int, cifar_stem: bool, precision: str, batch: int, micro: int,
                  device: torch.device) -> dict:
    """Two steps at global batch ``batch`` (micro 0: the plain pass); the second is timed."""
    from benchmarks.common import alone_on, benchmark_parts, synthetic_views
    from trainer.run.step import train_step
    from trainer.runtime.device import peak_memory_mb, synchronize

    parts = benchmark_parts(arch, image_size, precision, alone_on(device), micro_batch=micro, cifar_stem=cifar_stem)
    views = synthetic_views([(image_size, 2)], batch, device)

    def step() -> None:
        train_step(parts, views, lr=0.1)

    try:
        step()
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        elapsed = time.perf_counter() - start
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        return {"batch": batch, "micro": micro, "fits": False, "error": str(exc).splitlines()[0][:200]}
    return {"batch": batch, "micro": micro, "fits": True, "step_s": elapsed, "images_per_s": batch / elapsed,
            "peak_memory_mb": peak_memory_mb(device)}


def run_point(args: argparse.Namespace, batch: int, micro: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.grad_cache", "--point", str(batch), str(micro), "--arch", args.arch,
           "--image-size", str(args.image_size), "--precision", args.precision, "--device", args.device,
           "--memory-limit-gb", str(args.memory_limit_gb)] + (["--cifar-stem"] if args.cifar_stem else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:  # killed (out of memory) or crashed: the plain pass did not fit
        return {"batch": batch, "micro": micro, "fits": False, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.grad_cache", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", type=encoder_arch, help="a torchvision ResNet or timm/<name>")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem (16x the activations at 32 px)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="global batches")
    p.add_argument("--micro", type=int, default=128, help="micro-batch (images) for gradient caching")
    p.add_argument("--memory-limit-gb", type=float, default=16.0, help="CPU: address-space limit per point")
    p.add_argument("--point", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from trainer.runtime.device import choose_device

    device = choose_device(args.device)
    args.device = device.type
    if args.point:  # one measurement in this (fresh) process
        if device.type == "cpu":
            limit = int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(measure_point(args.arch, args.image_size, args.cifar_stem, args.precision, *args.point,
                                       device)))
        return {}
    rows = [run_point(args, batch, micro) for batch in args.batches for micro in (0, args.micro)]
    result = {**result_header("grad_cache", device_name(device)),
              "config": {"arch": args.arch, "image_size": args.image_size, "cifar_stem": args.cifar_stem,
                         "precision": args.precision, "micro_batch": args.micro,
                         "memory_limit_gb": args.memory_limit_gb if device.type == "cpu" else None,
                         "threads": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))},
              "rows": rows}
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
    table = []
    for batch in args.batches:
        cells: list[Any] = [batch]
        for micro in (0, args.micro):
            r = next(r for r in rows if r["batch"] == batch and r["micro"] == micro)
            cells += [f"{r['peak_memory_mb']:.0f} MB", r["images_per_s"]] if r["fits"] else ["does not fit", None]
        table.append(cells)
    print_table(f"gradient caching on {result['device']}: {args.arch} {args.image_size}px {args.precision}, "
                f"micro-batch {args.micro}",
                [("global batch", ">12"), (f"plain {memory}", ">24"), ("plain img/s", ">13.1f"),
                 (f"cached {memory}", ">24"), ("cached img/s", ">14.1f")], table)
    out = write_json(result, args.out or RESULTS / f"grad_cache_{device.type}_{args.arch}_{args.image_size}px.json")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
