"""Contrastive losses, chosen by name (``loss.name``).

A loss takes the projections of every view of this rank's images, ``(views, images, d)`` (view ``v``
of image ``i`` at ``[v, i]``), and returns ``(loss, accuracy)``: the loss to back-propagate and a
contrastive top-1 accuracy (no gradient). Each is one module that registers a builder taking the
run's ``LossConfig``; the step, the gradient cache and the benchmarks ask ``build_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.config import LossConfig

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LOSSES: dict[str, Callable[[LossConfig], LossFn]] = {}


def register_loss(name: str) -> Callable[[Callable[[LossConfig], LossFn]], Callable[[LossConfig], LossFn]]:
    """Register ``builder(cfg) -> loss_fn`` as ``loss.name=<name>``."""

    def register(builder: Callable[[LossConfig], LossFn]) -> Callable[[LossConfig], LossFn]:
        LOSSES[name] = builder
        return builder

    return register


def build_loss(cfg: LossConfig) -> LossFn:
    """The loss the run's config names."""
    return LOSSES[cfg.name](cfg)


from trainer.losses import nt_xent as _nt_xent  # noqa: E402, F401  (registers itself)
