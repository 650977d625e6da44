"""Mixed precision as one policy object: the autocast dtype, and for fp16 a dynamic loss scale.

The fp16 loss scale is GradScaler's algorithm kept entirely on the device: the gradients are
unscaled and checked for inf/nan by one fused kernel, the verdict stays a device tensor that the
optimizer step honours (``trainer.model.optim.guarded_step``), and the scale grows or backs off with
``torch._amp_update_scale_``. torch's GradScaler reads its verdict on the host at every step
(``found_inf.item()``) unless the optimizer takes it as a tensor; doing both here keeps the fp16
step free of host waits, and the checkpoint keeps GradScaler's state format.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from foundation.resume_policy import hyper, setting
from trainer.runtime.dataclass_yaml import Problem, failing
from trainer.runtime.torch_internals import unscale_and_check_, update_scale_


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = hyper("fp32")
    max_consecutive_nonfinite: int = setting(20)  # stop the run after this many skipped steps in a row

    def problems(self) -> list[Problem]:
        return failing([(self.max_consecutive_nonfinite > 0, "precision.max_consecutive_nonfinite",
                         self.max_consecutive_nonfinite, "must be a positive integer")])


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# GradScaler's defaults
INIT_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0**16, 2.0, 0.5, 2000


class PrecisionPolicy:
    """``fp32``: no autocast. ``bf16``: autocast, no scaling (bf16 has fp32's range). ``fp16``:
    autocast plus a dynamic loss scale whose overflow verdict ``unscale_`` returns as a tensor."""

    def __init__(self, dtype: str, device: torch.device) -> None:
        if dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"unknown precision {dtype!r}; choose one of {', '.join(AUTOCAST_DTYPES)}")
        self.device = device
        self.autocast_dtype = AUTOCAST_DTYPES[dtype]
        self.scaling = dtype == "fp16"
        self.scale = torch.full((), INIT_SCALE, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.scaling else loss).backward()

    def unscale_(self, params: Iterable[torch.Tensor]) -> torch.Tensor:
        """Divide the gradients by the loss scale in place; returns 1.0 (a 0-d float32 device
        tensor) when one of them is inf/nan, else 0.0. Always 0.0 without scaling."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        if not self.scaling:
            return found_inf
        by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            if p.grad is not None:
                by_kind[(p.grad.device, p.grad.dtype)].append(p.grad)
        inv_scale = self.scale.reciprocal()
        for grads in by_kind.values():
            unscale_and_check_(grads, found_inf, inv_scale)
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        """Back off the scale after an overflow, grow it after GROWTH_INTERVAL clean steps."""
        if self.scaling:
            update_scale_(self.scale, self.growth_tracker, found_inf, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL)

    def state_dict(self) -> dict[str, Any]:
        """GradScaler's format (read at checkpoints only: a host read is fine there)."""
        if not self.scaling:
            return {}
        return {"scale": self.scale.item(), "growth_factor": GROWTH_FACTOR, "backoff_factor": BACKOFF_FACTOR,
                "growth_interval": GROWTH_INTERVAL, "_growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaling:
            self.scale.fill_(float(state["scale"]))
            self.growth_tracker.fill_(int(state.get("_growth_tracker", 0)))
