"""The LARS step over a real model's parameters: ours (foreach kernels, the per-tensor loop, and
the one chosen by device) against timm's per-parameter Lars, on the same gradients."""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import print_table, timed_interleaved
from trainer.config import DEVICES, ModelConfig, OptimConfig
from trainer.model.optim import build_optimizer, default_foreach
from trainer.model.simclr import build_model


def bench_lars(arch: str, iters: int, device: torch.device) -> dict:
    try:
        from timm.optim import Lars
    except ImportError:
        return {"skipped": "timm not installed"}
    try:  # timm >= 1.0
        from timm.optim._param_groups import param_groups_weight_decay
    except ImportError:  # older timm (a GPU image may hold one)
        from timm.optim.optim_factory import param_groups_weight_decay
    model = build_model(ModelConfig(arch=arch), device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    row: dict = {"n_tensors": sum(1 for _ in model.parameters()),
                 "chosen": "foreach" if default_foreach(list(model.parameters())) else "per_tensor"}
    steps = {}
    for name, foreach in (("foreach", True), ("per_tensor", False)):
        ours = build_optimizer(model, OptimConfig(name="lars", weight_decay=1e-6), lr=0.1)
        for group in ours.param_groups:
            group["foreach"] = foreach
        steps[name] = ours.step
    steps["timm"] = Lars(param_groups_weight_decay(model, 1e-6), lr=0.1, momentum=0.9).step
    for name, samples in timed_interleaved(steps, device, 3, iters).items():
        row[f"{name}_ms"] = 1e3 * statistics.median(samples)
    row["ours_ms"] = row[f"{row['chosen']}_ms"]
    row["speedup"] = row["timm_ms"] / row["ours_ms"]
    return row


def main(argv: list[str] | None = None) -> dict:
    """``python -m benchmarks.lars --arch resnet50``: the LARS step alone, table and JSON."""
    import argparse

    from benchmarks.common import RESULTS, device_name, encoder_arch, result_header, write_json
    from trainer.runtime.device import choose_device

    p = argparse.ArgumentParser(prog="benchmarks.lars", description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"], type=encoder_arch)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    device = choose_device(args.device)
    rows = [{"arch": arch, **bench_lars(arch, args.iters, device)} for arch in args.arch]
    result = {**result_header("lars", device_name(device)), "rows": rows}
    print_table(f"LARS step on {result['device']} (ms, median of {args.iters})",
                [("model", "<10"), ("tensors", ">8"), ("foreach", ">10.2f"), ("per-tensor", ">12.2f"),
                 ("timm", ">8.2f"), ("chosen", ">12"), ("timm/chosen", ">13.2f")],
                [[r["arch"], f"skipped: {r['skipped']}"] if "skipped" in r else
                 [r["arch"], r["n_tensors"], r["foreach_ms"], r["per_tensor_ms"], r["timm_ms"], r["chosen"],
                  r["speedup"]] for r in rows])
    out = write_json(result, RESULTS / f"lars_{device.type}.json")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
