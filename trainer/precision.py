"""Mixed precision as one policy object: the autocast dtype, and for fp16 the GradScaler."""

from __future__ import annotations

from typing import Any

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionPolicy:
    """``fp32``: no autocast. ``bf16``: autocast, no scaling (bf16 has fp32's range). ``fp16``:
    autocast plus a GradScaler, whose skipped steps (inf/nan gradients) ``step`` reports."""

    def __init__(self, dtype: str, device: torch.device) -> None:
        if dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"unknown precision {dtype!r}; choose one of {', '.join(AUTOCAST_DTYPES)}")
        self.device_type = device.type
        self.autocast_dtype = AUTOCAST_DTYPES[dtype]
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step ``optimizer`` (unscaling first under fp16); True when the scaler skipped the step."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return False
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() < scale_before  # the scale drops only after a skipped step

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
