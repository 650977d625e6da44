"""The step time of view specifications against their FLOPs, as ratios to the first one in one run.

Multi-crop and resolution schedules are bought for their cost: 2 x 224 + 6 x 96 px costs about
1.7x two views of 224 px in FLOPs, a 160 px epoch about half a 224 px one. This times the real
training step (``trainer.run.step.train_step``: forward per size group, the run's loss, backward, LARS)
on each specification, interleaved round by round so that the machine's drift falls on all, and
counts each step's FLOPs (``torch.utils.flop_counter``, forward and backward). A step whose time
ratio stays near its FLOP ratio spends nothing on views beyond their arithmetic.

    simclr bench views                                           # CPU: ResNet-18, 2x32 vs 2x32+6x16 vs 2x24
    simclr bench views --arch resnet50 --views 2x224 2x224+6x96 2x160 --batch-size 64 --precision bf16   # GPU
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import (
    RESULTS,
    alone_on,
    benchmark_parts,
    device_name,
    encoder_arch,
    parse_views,
    print_table,
    result_header,
    summary,
    synthetic_views,
    timed_interleaved,
    write_json,
)
from trainer.config import DEVICES
from trainer.model.encoders import check_input_sizes


def step_flops(parts, groups: list[torch.Tensor]) -> int:
    """FLOPs of one training step on ``groups`` (forward and backward of the model and the loss)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        parts.forward_backward(groups)
    parts.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def bench_views(arch: str, specs: list[str], batch_size: int, precision: str, warmup: int, iters: int,
                device: torch.device) -> list[dict]:
    """One row per view specification: its step time and FLOPs, and both as ratios to the first."""
    from trainer.run.step import train_step

    sizes = {spec: parse_views(spec) for spec in specs}
    largest = max(size for groups in sizes.values() for size, _ in groups)
    parts = benchmark_parts(arch, largest, precision, alone_on(device))  # one model for every spec
    batches = {spec: synthetic_views(groups, batch_size, device) for spec, groups in sizes.items()}
    flops = {spec: step_flops(parts, batch) for spec, batch in batches.items()}
    times = timed_interleaved({spec: (lambda b=batch: train_step(parts, b, lr=0.1)) for spec, batch in batches.items()},
                              device, warmup, iters)
    base = specs[0]
    base_time = statistics.median(times[base])
    rows = []
    for spec in specs:
        time_ratio = statistics.median(times[spec]) / base_time
        flop_ratio = flops[spec] / flops[base]
        rows.append({"views": spec, "step": summary(times[spec]), "gflops": flops[spec] / 1e9,
                     "time_ratio": time_ratio, "flop_ratio": flop_ratio, "time_over_flops": time_ratio / flop_ratio})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="simclr bench views", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", type=encoder_arch, help="encoder: a torchvision ResNet or timm/<name>")
    p.add_argument("--views", nargs="+", default=["2x32", "2x32+6x16", "2x24"],
                   help="view specifications COUNTxSIZE[+COUNTxSIZE...]; ratios are to the first")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/views_<device>_<arch>.json)")
    args = p.parse_args(argv)
    try:
        for spec in args.views:
            parse_views(spec)
    except ValueError as exc:
        p.error(str(exc))
    # the sizes the encoder cannot take, before anything is built (a timm model with a fixed size or a patch)
    check_input_sizes(args.arch, False, [(f"--views {spec}", None, size) for spec in args.views
                                         for size, _ in parse_views(spec)])
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    rows = bench_views(args.arch, args.views, args.batch_size, args.precision, args.warmup, args.iters, device)
    result = {**result_header("views", device_name(device)),
              "config": {"arch": args.arch, "batch_size": args.batch_size, "precision": args.precision,
                         "warmup": args.warmup, "iters": args.iters}, "rows": rows}
    print_table(f"view specifications on {result['device']}: {args.arch}, batch {args.batch_size}, {args.precision} "
                f"(ratios to {args.views[0]}, one run)",
                [("views", "<16"), ("step ms", ">10.1f"), ("GFLOP", ">10.2f"), ("time x", ">9.2f"), ("FLOP x", ">9.2f"),
                 ("time/FLOP", ">11.2f")],
                [[r["views"], 1e3 * r["step"]["median_s"], r["gflops"], r["time_ratio"], r["flop_ratio"],
                  r["time_over_flops"]] for r in rows])
    out = write_json(result, args.out or RESULTS / f"views_{device.type}_{args.arch.replace('/', '-')}.json")
    print(f"written {out}")
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
