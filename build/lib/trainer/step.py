"""The training step: built once per run (``build_forward_backward``), run once per batch
(``train_step``), and the very function the benchmarks time.

A steady-state step asks the host for nothing: the skip verdict (a non-finite loss on any rank,
or an fp16 overflow) is a device tensor that the optimizer honours, and the counts of skipped
steps are device tensors read at the log window (``trainer.loop``). ``tests/test_step_syncs.py``
counts the host syncs of a window of steps and requires zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import nn

from trainer.distributed import max_over_ranks
from trainer.grad_cache import cached_forward_backward, two_view_images
from trainer.loss import nt_xent
from trainer.optim import guarded_step
from trainer.precision import PrecisionPolicy

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ForwardBackward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepOutcome:
    """Device tensors only: reading any of them is a host sync, left to the log window."""

    loss: torch.Tensor  # this rank's loss, detached
    accuracy: torch.Tensor
    skipped: torch.Tensor  # 1.0: the loss was not finite on some rank, so no rank updated its weights
    overflow: torch.Tensor  # 1.0: fp16 gradients overflowed (loss finite): the update was skipped, the scale lowered


def build_forward_backward(model: nn.Module, ddp_model: nn.Module, precision: PrecisionPolicy,
                           temperature: float, gather_negatives: bool, micro_batch: int,
                           channels_last: bool) -> ForwardBackward:
    """``(view1, view2) -> (loss, accuracy)`` that fills the parameters' gradients: one pass, or
    gradient caching in chunks of ``micro_batch`` images (``trainer.grad_cache``)."""
    loss_fn: LossFn = partial(nt_xent, temperature=temperature, gather=gather_negatives)
    if micro_batch:
        return partial(cached_forward_backward, model, ddp_model, micro_batch=micro_batch, loss_fn=loss_fn,
                       precision=precision, channels_last=channels_last)

    def forward_backward(view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with precision.autocast():
            z1, z2 = ddp_model(two_view_images(view1, view2, channels_last)).chunk(2)
        loss, accuracy = loss_fn(z1, z2)
        precision.backward(loss)
        return loss, accuracy

    return forward_backward


class StepParts(Protocol):
    """What a step needs of the run's parts (``trainer.parts.TrainParts`` has it; an
    ``online_probe`` attribute, when present and set, is trained on the step's features too)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward_backward: ForwardBackward
    precision: PrecisionPolicy


def train_step(parts: StepParts, view1: torch.Tensor, view2: torch.Tensor, lr: float,
               labels: torch.Tensor | None = None) -> StepOutcome:
    """One optimizer step on a batch of two views: set the lr, zero the gradients, forward and
    backward, agree across ranks whether the loss was finite, step (a no-op on the device when
    not). Every rank takes the same decision without reading it."""
    optimizer, precision = parts.optimizer, parts.precision
    probe = getattr(parts, "online_probe", None) if labels is not None else None
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if probe is not None:
        parts.model.probe_features = []
    loss, accuracy = parts.forward_backward(view1, view2)
    loss = loss.detach()
    nonfinite = max_over_ranks((~torch.isfinite(loss)).float())
    # fp16: an overflow with a finite loss is the loss scale's business (it backs off), not a bad step
    overflow = precision.unscale_(p for group in optimizer.param_groups for p in group["params"]) * (1 - nonfinite)
    guarded_step(optimizer, torch.maximum(nonfinite, overflow))
    precision.update(overflow)
    if probe is not None:
        probe.update(torch.cat(parts.model.probe_features), labels, nonfinite)
        parts.model.probe_features = None
    return StepOutcome(loss, accuracy, skipped=nonfinite, overflow=overflow)
