"""The step's own kernels beside what each replaces, on one device, in one JSON: our SyncBatchNorm's
forward+backward against BatchNorm2d (cuDNN on a GPU) at ResNet-50's stage shapes, and our LARS step
against timm's ``Lars`` on a model's parameters. The GPU proof runs it as a stage (with ``--check``);
``simclr bench kernels`` runs it anywhere.

    python -m benchmarks.kernels --batch 64 --iters 20 --check   # table and JSON; exit 1 on a missed target

Targets (#41): LARS at most 1.0x timm's time on every device; SyncBatchNorm at most 1.5x BatchNorm2d
on the CPU (on CUDA it is timed against cuDNN and reported, with no target set yet). ``--check`` exits 1
after writing the JSON when a target is missed, so the figures come back either way.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.lars import bench_lars
from benchmarks.sync_batchnorm import bench_sync_batchnorm, print_rows

LARS_TARGET = 1.0  # ours / timm's Lars, every device
SYNC_BN_CPU_TARGET = 1.5  # ours / BatchNorm2d, on the CPU


def missed_targets(device: torch.device, sync_bn_worst: float, lars_rows: list[dict]) -> list[str]:
    """What the figures fall short of, one line each (empty: every target met)."""
    missed = [f"LARS on {row['arch']}: {1 / row['speedup']:.2f}x timm's time (target <= {LARS_TARGET:.1f}x)"
              for row in lars_rows if "speedup" in row and 1 / row["speedup"] > LARS_TARGET]
    if device.type == "cpu" and sync_bn_worst > SYNC_BN_CPU_TARGET:
        missed.append(f"SyncBatchNorm: {sync_bn_worst:.2f}x BatchNorm2d's time (target <= {SYNC_BN_CPU_TARGET}x)")
    return missed


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import RESULTS, device_name, encoder_arch, print_table, result_header, write_json
    from trainer.config import DEVICES, ConfigError
    from trainer.runtime.device import choose_device

    p = argparse.ArgumentParser(prog="simclr bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batch", type=int, default=8, help="images per rank for SyncBatchNorm's input")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (medians are reported)")
    p.add_argument("--arch", nargs="+", default=["resnet50"], type=encoder_arch,
                   help="models whose parameters LARS steps over")
    p.add_argument("--check", action="store_true", help="exit 1 (after writing the JSON) when a target is missed")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = p.parse_args(argv)
    for flag, value in (("--batch", args.batch), ("--iters", args.iters)):
        if value < 1:
            raise ConfigError(f"simclr bench kernels {flag} {value}: must be at least 1")
    device = choose_device(args.device)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    sync_bn = [row for dtype in dtypes for row in bench_sync_batchnorm(device, args.batch, args.iters, dtype)]
    lars = [{"arch": arch, **bench_lars(arch, args.iters, device)} for arch in args.arch]
    worst = max(r["ratio"] for r in sync_bn)
    result = {**result_header("kernels", device_name(device)), "batch": args.batch, "iters": args.iters,
              "sync_batchnorm": {"rows": sync_bn, "worst_ratio": worst}, "lars": lars,
              "targets": {"lars_over_timm": LARS_TARGET, "sync_batchnorm_over_batchnorm2d_cpu": SYNC_BN_CPU_TARGET},
              "missed": missed_targets(device, worst, lars), "checked": args.check}
    print_rows(sync_bn, result["device"])
    print_table(f"LARS step on {result['device']} (ms, median of {args.iters})",
                [("model", "<10"), ("tensors", ">8"), ("ours", ">8.2f"), ("timm", ">8.2f"), ("ours/timm", ">10.2f")],
                [[r["arch"], f"skipped: {r['skipped']}"] if "skipped" in r else
                 [r["arch"], r["n_tensors"], r["ours_ms"], r["timm_ms"], 1 / r["speedup"]] for r in lars])
    out = write_json(result, args.out or RESULTS / f"kernels_{device.type}.json")
    print(f"\ntargets {'missed: ' + '; '.join(result['missed']) if result['missed'] else 'met'}; wrote {out}")
    if args.check and result["missed"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
