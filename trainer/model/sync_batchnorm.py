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
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foundation import collectives


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def _local_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-channel mean and biased variance (fp32), each computed stably: Welford's
    (``torch.batch_norm_stats``) on CUDA; on the CPU, where that kernel does not exist, the two-pass
    statistics of torch's training batch norm (``batch_norm_update_stats``, accumulated in fp32 for
    low precision; a zero momentum leaves the scratch running buffers as they are)."""
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, eps)
        return mean.float(), invstd.float().pow(-2) - eps
    scratch = torch.zeros(2, x.shape[1], dtype=torch.float32)
    mean, var = torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)
    return mean.float(), var.float()


class _SyncBatchNormFunction(torch.autograd.Function):
    """One all-reduce forward ([n mean, n (var + mean^2), n] of each rank, in float64: combined
    from stable per-rank statistics, so a mean of 1e4 with a std of 1 loses nothing) and one
    backward ([sum dy, sum dy (x - mean)]); no host syncs, no fp32 copy of the activations. On
    CUDA torch's fused batch-norm kernels do each pass; on the CPU, torch's batch-norm statistics,
    its inference batch norm at the global statistics for the output (one pass), and its backward for
    the sums."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                group, clock=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        c, n = x.shape[1], x.numel() // x.shape[1]
        local_mean, local_var = _local_stats(x, eps)
        mean64 = local_mean.double()
        count = torch.full((1,), float(n), dtype=torch.float64, device=x.device)
        stats = torch.cat([mean64 * n, (local_var.double() + mean64 * mean64) * n, count])
        with clock.collective() if clock is not None else nullcontext():  # a wait for the slowest rank: not own work
            collectives.all_reduce_(stats, group=group)
        total = stats[2 * c :]
        mean64 = stats[:c] / total
        mean, var = mean64.float(), (stats[c : 2 * c] / total - mean64 * mean64).clamp_(min=0).float()
        invstd = torch.rsqrt(var + eps)
        if x.is_cuda:
            out = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        else:  # the inference batch norm at the global statistics: one pass
            out = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
        ctx.save_for_backward(x, weight, mean, invstd, var, total)
        ctx.mark_non_differentiable(mean, var, total)
        ctx.group, ctx.eps, ctx.has_bias, ctx.clock = group, eps, bias is not None, clock
        return out, mean, var, total.float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *_):  # type: ignore[override]
        x, weight, mean, invstd, var, total = ctx.saved_tensors
        if not (grad_out.is_contiguous() or grad_out.is_contiguous(memory_format=torch.channels_last)):
            grad_out = grad_out.contiguous()
        c = x.shape[1]
        if x.is_cuda:
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                grad_out, x, mean, invstd, weight, True, weight is not None, ctx.has_bias)
        else:  # torch's batch-norm backward at the global statistics: sum dy and sum dy * x-hat, one pass
            _, grad_weight, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True])
            sum_dy_xmu = grad_weight / invstd
            grad_bias = sum_dy
        grad_x = None
        if ctx.needs_input_grad[0]:
            local = torch.cat([sum_dy.float(), sum_dy_xmu.float()])
            with ctx.clock.collective() if ctx.clock is not None else nullcontext():  # not own work either
                collectives.all_reduce_(local, group=ctx.group)
            sum_dy, sum_dy_xmu = local[:c], local[c:]
            w = weight.float() if weight is not None else None
            if x.is_cuda:
                grad_x = torch.batch_norm_backward_elemt(grad_out, x, mean, invstd, w, sum_dy, sum_dy_xmu,
                                                         total.to(torch.int32))
            else:  # dy * a + x * b + k, per channel: two passes
                scale = invstd if w is None else invstd * w
                count = total.float()  # (float64 from the all-reduce: it would promote every pass below)
                mean_dy, mean_dy_xmu = sum_dy / count, sum_dy_xmu / count
                b = -scale * invstd * invstd * mean_dy_xmu
                k = -scale * mean_dy - b * mean
                # x * b + k by the inference batch norm's kernel (mean 0, variance 1, no eps): a
                # broadcast addcmul costs more on the CPU
                ones, zeros = torch.ones_like(b), torch.zeros_like(b)
                grad_x = torch.native_batch_norm(x, b, k, zeros, ones, False, 0.0, 0.0)[0]
                grad_x.addcmul_(grad_out, _channel_view(scale, x.ndim).to(x.dtype))
        grad_weight = grad_weight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_bias.to(grad_out.dtype if weight is None else weight.dtype) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
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
        self.step_clock = None  # trainer.observe.step_clock.StepClock: times the all-reduces

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
