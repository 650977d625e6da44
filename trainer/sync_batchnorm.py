"""Batch normalisation with statistics over every rank of a process group, without host waits.

torch.nn.SyncBatchNorm gathers per-rank counts and drops empty ranks with boolean-mask lookups
(``count_all[mask]``): three host syncs per layer, about 160 per ResNet-50 forward. In SimCLR a
rank's batch is never empty, so the statistics need only sums: one all-reduce of
``[sum, sum of squares, count]`` per layer forward and one of ``[sum dy, sum dy*(x-mean)]`` per
layer backward, all on the device. It also runs on gloo, so its numerics are tested on the CPU.

The weight and bias gradients are this rank's own (DDP averages them, as for any parameter); the
input gradient includes every rank's share through the all-reduced sums, so 2 ranks equal plain
BatchNorm over their concatenated batch (``tests/test_sync_batchnorm.py``).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foundation import collectives


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                group, clock=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        dims = [d for d in range(x.ndim) if d != 1]
        xf = x.float()
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        with clock.collective() if clock is not None else nullcontext():  # a wait for the slowest rank: not own work
            dist.all_reduce(stats, group=group)
        c = x.shape[1]
        total = stats[2 * c :]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_(min=0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        out = (xf * _channel_view(scale, x.ndim) + _channel_view(shift, x.ndim)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.mark_non_differentiable(mean, var, total)
        ctx.group, ctx.has_bias = group, bias is not None
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *_):  # type: ignore[override]
        x, weight, mean, invstd, total = ctx.saved_tensors
        dims = [d for d in range(x.ndim) if d != 1]
        dy = grad_out.float()
        xhat = (x.float() - _channel_view(mean, x.ndim)) * _channel_view(invstd, x.ndim)
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        grad_weight = local[x.shape[1] :].clone() if weight is not None else None
        grad_bias = local[: x.shape[1]].clone() if ctx.has_bias else None
        if ctx.needs_input_grad[0]:
            dist.all_reduce(local, group=ctx.group)
            c = x.shape[1]
            mean_dy, mean_dy_xhat = local[:c] / total, local[c:] / total
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = (dy - _channel_view(mean_dy, x.ndim) - xhat * _channel_view(mean_dy_xhat, x.ndim))
            grad_x = (grad_x * _channel_view(scale, x.ndim)).to(x.dtype)
        else:
            grad_x = None
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(weight.dtype if weight is not None else grad_out.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span the ranks of ``process_group`` (None: all ranks).
    Outside training, or alone, it is plain BatchNorm. ``plain_class`` is the BatchNorm class it
    replaced, restored by ``revert_sync_batchnorm``. A BatchNorm that carries modules of its own
    after the normalisation (timm's ``BatchNormAct2d``: dropout, then activation) keeps them as its
    children, applied in order, under their own names (so state dict keys do not change)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, plain_class: type = nn.BatchNorm2d,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.plain_class = plain_class
        self.step_clock = None  # trainer.step_clock.StepClock: times the forward's all-reduce

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.ndim}-D")

    def _distributed(self) -> bool:
        return collectives.active()  # even alone: a 1-rank NCCL job runs the all-reduces a 64-rank one does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._normalise(x)
        for after in self.children():  # timm's BatchNormAct2d: drop, act
            out = after(out)
        return out

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and self._distributed()):
            return super().forward(x)
        out, mean, var, total = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, self.process_group,
                                                             self.step_clock)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: a cumulative average, 1/n computed on the device (no host read)
                factor = 1.0 / self.num_batches_tracked.float() if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)
        return out


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm of ``module`` replaced by ``SyncBatchNorm`` with the same parameters and
    buffers (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, plain_class=type(module))
        _copy_state(module, out)
        out.plain_template = [copy.deepcopy(module)]  # a list: not a submodule, not in the state dict
        for name, child in module.named_children():
            out.add_module(name, child)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``SyncBatchNorm`` turned back into the BatchNorm it replaced:
    no process group is copied (deep-copying one fails), so the result is a plain model that loads
    anywhere (the exported encoder is a plain torchvision ResNet)."""
    groups = {id(m.process_group): None for m in module.modules()
              if isinstance(m, SyncBatchNorm) and m.process_group is not None}
    return _to_plain(copy.deepcopy(module, memo=groups))


def _to_plain(module: nn.Module) -> nn.Module:
    if isinstance(module, SyncBatchNorm):
        template = getattr(module, "plain_template", None)
        if template is not None:  # the module it replaced, children and all (timm's act layers)
            out = copy.deepcopy(template[0])
            out.load_state_dict(module.state_dict())
            return out
        out = module.plain_class(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        _copy_state(module, out)
        return out
    for name, child in module.named_children():
        module.add_module(name, _to_plain(child))
    return module


def _copy_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    with torch.no_grad():
        if src.affine:
            dst.weight, dst.bias = src.weight, src.bias
        if src.track_running_stats:
            dst.running_mean, dst.running_var = src.running_mean, src.running_var
            dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    dst.to(src.weight.device if src.affine else src.running_mean.device)
