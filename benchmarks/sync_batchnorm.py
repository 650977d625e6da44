"""Our SyncBatchNorm's forward + backward against torch's BatchNorm2d (cuDNN on a GPU) on the same
tensors, at ResNet-50's stage shapes: what synchronising the statistics costs beyond the layer
itself. Ours runs in a process group (a 1-rank one made here when there is none), so its two
all-reduces are in the time, as in training.

    python -m benchmarks.sync_batchnorm --batch 8 --iters 10      # table and JSON
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch
from torch import nn

from benchmarks.common import print_table, timed_interleaved

# (channels, side) of the BatchNorm inputs that dominate each ResNet-50 stage (the bottleneck's expansion)
RESNET50_STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A 1-rank process group for the duration, unless one exists (then that one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()


def fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One forward and backward of ``layer`` on ``x`` (its gradient cleared first: no accumulation pass)."""
    def step() -> None:
        x.grad = None
        layer(x).backward(dy)
    return step


def bench_sync_batchnorm(device: torch.device, batch: int, iters: int, dtype: torch.dtype = torch.float32,
                         stages: tuple[tuple[int, int], ...] = RESNET50_STAGES) -> list[dict]:
    """One row a stage shape: forward+backward ms of ours and of BatchNorm2d (median, interleaved)."""
    from trainer.model.sync_batchnorm import convert_sync_batchnorm

    rows = []
    with process_group(device):
        for channels, side in stages:
            plain = nn.BatchNorm2d(channels).to(device)
            ours = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(channels)))[0].to(device)
            x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=True)
            steps = {"ours": fwd_bwd(ours, x, torch.randn_like(x)), "plain": fwd_bwd(plain, x, torch.randn_like(x))}
            samples = timed_interleaved(steps, device, 2, iters)
            ours_ms, plain_ms = (1e3 * statistics.median(samples[k]) for k in ("ours", "plain"))
            rows.append({"shape": [batch, channels, side, side], "dtype": str(dtype).removeprefix("torch."),
                         "ours_ms": ours_ms, "batchnorm2d_ms": plain_ms, "ratio": ours_ms / plain_ms})
    return rows


def print_rows(rows: list[dict], device: str) -> None:
    print_table(f"SyncBatchNorm forward+backward vs BatchNorm2d on {device} (ms, median; ours in a process group)",
                [("shape", "<22"), ("dtype", ">10"), ("ours", ">10.2f"), ("BatchNorm2d", ">13.2f"),
                 ("ours/BN", ">9.2f")],
                [["x".join(map(str, r["shape"])), r["dtype"], r["ours_ms"], r["batchnorm2d_ms"], r["ratio"]]
                 for r in rows])


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import RESULTS, device_name, result_header, write_json
    from trainer.config import DEVICES
    from trainer.runtime.device import choose_device

    p = argparse.ArgumentParser(prog="benchmarks.sync_batchnorm", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batch", type=int, default=8, help="images per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on the CPU, float32 and bfloat16 on CUDA")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sync_batchnorm_<device>.json)")
    args = p.parse_args(argv)
    device = choose_device(args.device)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    rows = [row for name in dtypes for row in bench_sync_batchnorm(device, args.batch, args.iters,
                                                                     getattr(torch, name))]
    result = {**result_header("sync_batchnorm", device_name(device)), "batch": args.batch, "iters": args.iters,
              "rows": rows, "worst_ratio": max(r["ratio"] for r in rows)}
    print_rows(rows, result["device"])
    out = write_json(result, args.out or RESULTS / f"sync_batchnorm_{device.type}.json")
    print(f"\nworst ours/BatchNorm2d: {result['worst_ratio']:.2f}; wrote {out}")
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
