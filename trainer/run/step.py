"""The training step: built once per run (``build_forward_backward``), run once per batch
(``train_step``), and the very function the benchmarks time.

A batch is a list of view size groups, each ``(views, images, 3, s, s)`` (``data_pipeline.views``):
the model runs one encoder pass per group and one head pass, and the loss sees every view's
projection as ``(views, images, d)``.

A steady-state step asks the host for nothing: the skip verdict (a non-finite loss on any rank,
or an fp16 overflow) is a device tensor that the optimizer honours, and the counts of skipped
steps are device tensors read at the log window (``trainer.run.loop``). ``tests/test_step_syncs.py``
counts the host syncs of a window of steps and requires zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import nn

from foundation.collectives import all_reduce_
from trainer.evaluation.online_probe import OnlineProbe
from trainer.losses import LossFn
from trainer.model.optim import guarded_step
from trainer.model.precision import PrecisionPolicy
from trainer.run.grad_cache import cached_forward_backward, model_input

# size groups -> (loss, accuracy, the first view's detached features for the online probe)
ForwardBackward = Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class StepOutcome:
    """Device tensors only: reading any of them is a host sync, left to the log window."""

    loss: torch.Tensor  # this rank's loss, detached
    accuracy: torch.Tensor
    skipped: torch.Tensor  # 1.0: the loss was not finite on some rank, so no rank updated its weights
    overflow: torch.Tensor  # 1.0: fp16 gradients overflowed (loss finite): the update was skipped, the scale lowered


def build_forward_backward(model: nn.Module, ddp_model: nn.Module, precision: PrecisionPolicy, loss_fn: LossFn,
                           micro_batch: int, channels_last: bool) -> ForwardBackward:
    """``size groups -> (loss, accuracy, features)`` that fills the parameters' gradients: one pass,
    or gradient caching in chunks of ``micro_batch`` images (``trainer.run.grad_cache``)."""
    if micro_batch:
        return partial(cached_forward_backward, model, ddp_model, micro_batch=micro_batch, loss_fn=loss_fn,
                       precision=precision, channels_last=channels_last)

    def forward_backward(size_groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views, images = sum(g.shape[0] for g in size_groups), size_groups[0].shape[1]
        with precision.autocast():
            out = ddp_model(model_input(size_groups, channels_last))
        loss, accuracy = loss_fn(out.projections.view(views, images, -1))
        precision.backward(loss)
        return loss, accuracy, out.features[0][:images].detach()

    return forward_backward


class StepParts(Protocol):
    """What a step needs of the run's parts (``trainer.run.parts.TrainParts`` has it)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward_backward: ForwardBackward
    precision: PrecisionPolicy
    online_probe: OnlineProbe | None  # trained on the first view's features when the batch has labels


def train_step(parts: StepParts, size_groups: list[torch.Tensor], lr: float,
               labels: torch.Tensor | None = None) -> StepOutcome:
    """One optimizer step on a batch of view size groups: set the lr, zero the gradients, forward
    and backward, agree across ranks whether the loss was finite, step (a no-op on the device when
    not). Every rank takes the same decision without reading it."""
    optimizer, precision = parts.optimizer, parts.precision
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy, features = parts.forward_backward(size_groups)
    loss = loss.detach()
    nonfinite = all_reduce_((~torch.isfinite(loss)).float(), "max")
    # fp16: an overflow with a finite loss is the loss scale's business (it backs off), not a bad step
    overflow = precision.unscale_(p for group in optimizer.param_groups for p in group["params"]) * (1 - nonfinite)
    guarded_step(optimizer, torch.maximum(nonfinite, overflow))
    precision.update(overflow)
    if parts.online_probe is not None and labels is not None:
        parts.online_probe.update(features, labels, nonfinite)
    return StepOutcome(loss, accuracy, skipped=nonfinite, overflow=overflow)
