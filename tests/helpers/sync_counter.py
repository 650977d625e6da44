"""Counting, on the CPU, the calls that would make the host wait for a GPU (tests only).

On a GPU each of these blocks the CPU until the queued kernels have run, so it cannot queue the
next step's: ``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy``, ``bool``/``float``/``int`` of a
tensor, and Python data turned into a tensor on a device (``torch.tensor(x, device=...)``,
``torch.as_tensor(x, device=...)``). It patches torch process-wide while installed, which is why it
lives in the tests: the product counts syncs on CUDA with torch's own sync debug mode
(``trainer.observe.device_syncs``). Counting the calls works without a GPU, so CI fails on a sync added to
the step.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch

SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class SyncCounter:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.active = False
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, owner, name: str, is_sync=lambda *a, **k: True) -> None:
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            if self.active and is_sync(*args, **kwargs):
                self.counts[name] += 1
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, counting)

    @contextmanager
    def installed(self):
        for name in SYNCING_METHODS:
            self._wrap(torch.Tensor, name)
        for name in ("tensor", "as_tensor"):  # Python data copied to a device
            self._wrap(torch, name, lambda data, *a, **k: k.get("device") is not None
                       and not isinstance(data, torch.Tensor))
        try:
            yield self
        finally:
            for owner, name, original in reversed(self._saved):
                setattr(owner, name, original)
            self._saved.clear()

    @contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was
