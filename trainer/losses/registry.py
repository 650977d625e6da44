"""The loss registry: ``loss.name`` -> a builder taking the run's ``LossConfig``.

A loss takes the projections of every view of this rank's images, ``(views, images, d)`` (view ``v``
of image ``i`` at ``[v, i]``), and returns ``(loss, accuracy)``: the loss to back-propagate and a
contrastive top-1 accuracy (no gradient). Each is one module in ``trainer/losses/`` that registers a
builder; the step, the gradient cache and the benchmarks ask ``build_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from foundation.registry import registrar
from foundation.resume_policy import hyper

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LossConfig:
    name: str = hyper("nt_xent")  # a loss registered in trainer/losses/ (nt_xent: SimCLR's, for any number of views)
    temperature: float = hyper(0.1)
    gather_negatives: bool = hyper(True)  # negatives from the global batch across ranks


LossBuilder = Callable[[LossConfig], LossFn]
LOSSES: dict[str, LossBuilder] = {}


register_loss = registrar(LOSSES)  # @register_loss("name"): builder(cfg) -> loss_fn, as loss.name=<name>


def build_loss(cfg: LossConfig) -> LossFn:
    """The loss the run's config names."""
    return LOSSES[cfg.name](cfg)
