"""Counting the host's waits for the GPU with torch's own sync debug mode: nothing patched.

Inside ``counting()`` CUDA's sync debug mode is "warn": every call that makes the host wait for the
device (``.item()``, ``.cpu()``, a host read of a device tensor, a blocking copy) raises torch's
warning, which is counted here and not shown. On the CPU the host is the device: there is no wait to
count, and ``total`` is None. The training run counts one steady-state step for its verdict
(``trainer.observe.bottlenecks``); the feed benchmark counts its steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SYNC_WARNING = "synchroniz"  # in torch's message: "called a synchronizing CUDA operation"


class DeviceSyncCounter:
    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.count = 0

    @property
    def total(self) -> int | None:
        """The syncs counted so far; None on the CPU (nothing to wait for)."""
        return self.count if self.enabled else None

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count the host's waits for the device inside (CUDA); a no-op elsewhere."""
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.count += sum(SYNC_WARNING in str(w.message) for w in seen)
