"""Every private torch operator we call, in one place: the kernels torch's own public classes run
(``SGD(fused=True)``, ``GradScaler``), called directly because the public classes read a verdict on
the host every step (GradScaler's ``found_inf``) or cannot take a device-side skip flag (SGD). What
they take is pinned by ``tests/test_optim.py::test_the_private_torch_kernels_we_call_take_what_we_pass``
on the installed torch, so an upgrade that changes one fails there, not in a user's run."""

from __future__ import annotations

import torch


def fused_sgd_(params: list[torch.Tensor], updates: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
               lr: float, momentum: float, found_inf: torch.Tensor | None) -> None:
    """``m = momentum * m + u; w -= lr * m`` over the tensors in one kernel, a no-op where
    ``found_inf`` is set (SGD(fused=True)'s kernel, without weight decay or dampening)."""
    torch._fused_sgd_(params, updates, momentum_buffers, weight_decay=0.0, momentum=momentum, lr=lr, dampening=0.0,
                      nesterov=False, maximize=False, is_first_step=False, found_inf=found_inf)


def unscale_and_check_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """``grads *= inv_scale``, setting ``found_inf`` where any is inf or NaN (GradScaler.unscale_'s kernel;
    the grads share one device and dtype)."""
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


def update_scale_(scale: torch.Tensor, growth_tracker: torch.Tensor, found_inf: torch.Tensor, growth_factor: float,
                  backoff_factor: float, growth_interval: int) -> None:
    """GradScaler.update's kernel: back off ``scale`` after an overflow, grow it after
    ``growth_interval`` clean steps, on the device."""
    torch._amp_update_scale_(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval)
