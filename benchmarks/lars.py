"""The LARS step over a real model's parameters: ours (foreach kernels, the per-tensor loop, and
the one chosen by device) against timm's per-parameter Lars, on the same gradients."""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import timed
from trainer.config import ModelConfig, OptimConfig
from trainer.model import build_model
from trainer.optim import build_optimizer, default_foreach


def bench_lars(arch: str, iters: int, device: torch.device) -> dict:
    try:
        from timm.optim import Lars
        from timm.optim._param_groups import param_groups_weight_decay
    except ImportError:
        return {"skipped": "timm not installed"}
    model = build_model(ModelConfig(arch=arch), device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    row: dict = {"n_tensors": sum(1 for _ in model.parameters()),
                 "chosen": "foreach" if default_foreach(list(model.parameters())) else "per_tensor"}
    for name, foreach in (("foreach", True), ("per_tensor", False)):
        ours = build_optimizer(model, OptimConfig(name="lars", weight_decay=1e-6), lr=0.1)
        for group in ours.param_groups:
            group["foreach"] = foreach
        row[f"{name}_ms"] = 1e3 * statistics.median(timed(ours.step, device, 3, iters))
    theirs = Lars(param_groups_weight_decay(model, 1e-6), lr=0.1, momentum=0.9)
    row["timm_ms"] = 1e3 * statistics.median(timed(theirs.step, device, 3, iters))
    row["ours_ms"] = row[f"{row['chosen']}_ms"]
    row["speedup"] = row["timm_ms"] / row["ours_ms"]
    return row
