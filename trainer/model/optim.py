"""Optimizers: LARS (foreach), SGD and AdamW, with SimCLR's parameter groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from foundation.resume_policy import hyper
from trainer.runtime.dataclass_yaml import Problem, failing
from trainer.runtime.torch_internals import fused_sgd_


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = hyper("lars")
    lr: float = hyper(0.3)  # base lr, scaled by lr_scaling with the global batch
    lr_scaling: Literal["linear", "sqrt", "none"] = hyper("linear")  # linear: lr*B/256, sqrt: lr*sqrt(B)
    weight_decay: float = hyper(1e-6)
    momentum: float = hyper(0.9)
    betas: tuple[float, float] = hyper((0.9, 0.999))  # adamw only
    trust_coefficient: float = hyper(0.001)  # LARS eta
    trust_clip: bool = hyper(False)  # LARC-style clipping of the trust ratio
    exclude_bias_and_norm: bool = hyper(True)  # ndim<=1 params: no weight decay, no LARS adaptation
    warmup_epochs: float = hyper(10.0)
    schedule: Literal["cosine", "constant"] = hyper("cosine")
    final_lr_fraction: float = hyper(0.0)

    def problems(self) -> list[Problem]:
        return failing([
            (self.lr > 0, "optim.lr", self.lr, "must be > 0"),
            (self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0"),
            (0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)"),
            (self.trust_coefficient > 0, "optim.trust_coefficient", self.trust_coefficient, "must be > 0"),
            (self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be >= 0"),
            (0 <= self.final_lr_fraction <= 1, "optim.final_lr_fraction", self.final_lr_fraction,
             "must be in [0, 1]")])


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool) -> list[dict]:
    """Split parameters: ndim<=1 tensors (biases, BN affine) get no weight decay and no LARS
    adaptation, as in SimCLR and timm's ``param_groups_weight_decay``."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars_adapt": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_adapt": False})
    return groups


def default_foreach(params: list[torch.Tensor]) -> bool:
    """Whether the multi-tensor (foreach) kernels pay off for ``params``: on CUDA they fuse a whole
    group into a few launches (7.5x a per-tensor loop on an H100); on the CPU they are not fused
    and lose to the plain loop (about 1.8x its time on ResNet-50). torch's own optimizers choose
    the same way."""
    return bool(params) and all(p.is_cuda for p in params)


class LARS(torch.optim.Optimizer):
    r"""Layer-wise adaptive rate scaling (You et al., 2017) with heavy-ball momentum.

    For each adapted tensor ``w`` with gradient ``g``, weight decay ``wd``, trust coefficient
    ``eta`` and learning rate ``lr``:

        trust = eta * |w| / (|g| + wd * |w| + eps)     (1 where |w| or |g| is 0)
        trust = min(trust / lr, 1)                      (only with trust_clip, LARC-style)
        u     = (g + wd * w) * trust
        m     = momentum * m + u;   w = w - lr * m

    Groups with ``lars_adapt=False`` (biases, BatchNorm) take ``u = g + wd * w``: plain momentum
    SGD. ``foreach=None`` picks the implementation of ``u`` by device (``default_foreach``): one set
    of ``torch._foreach_*`` calls per group on CUDA, a loop over tensors on the CPU; both compute
    the same update. The momentum and weight update is torch's fused SGD kernel, which honours
    ``found_inf`` (set by ``guarded_step``): a skipped step leaves weights and momentum untouched,
    decided on the device.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        trust_clip: bool = False,
        eps: float = 1e-8,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        trust_clip=trust_clip, eps=eps, lars_adapt=True, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            foreach = group.get("foreach")  # absent in checkpoints written before the choice existed
            foreach = default_foreach(params) if foreach is None else foreach
            (self._update_foreach if foreach else self._update_per_tensor)(group, params)
        return loss

    def _apply(self, group: dict, params: list[torch.Tensor], updates: list[torch.Tensor],
               bufs: list[torch.Tensor] | None = None) -> None:
        """m = momentum * m + u;  w = w - lr * m, skipped on the device when ``self.found_inf`` is set."""
        if bufs is None:
            bufs = self._momentum_buffers(params) if group["momentum"] != 0 else []
        fused_sgd_(params, updates, bufs, group["lr"], group["momentum"], getattr(self, "found_inf", None))

    def _momentum_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        bufs = []
        for p in params:  # a state lookup per tensor; the arithmetic is elsewhere
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        return bufs

    def _trust(self, group: dict, w_norm: torch.Tensor, g_norm: torch.Tensor) -> torch.Tensor:
        trust = group["trust_coefficient"] * w_norm / (g_norm + w_norm * group["weight_decay"] + group["eps"])
        trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
        return torch.clamp(trust / group["lr"], max=1.0) if group["trust_clip"] else trust

    def _update_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        wd = group["weight_decay"]
        update = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
        if group["lars_adapt"]:
            w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
            trust = list(self._trust(group, w_norm, g_norm).unbind())
            if wd != 0:  # our own tensors: scaled in place, no second allocation
                torch._foreach_mul_(update, trust)
            else:
                update = torch._foreach_mul(update, trust)
        self._apply(group, params, list(update))

    def _update_per_tensor(self, group: dict, params: list[torch.Tensor]) -> None:
        """The CPU's loop (its foreach kernels are not fused). Each update is made in one scratch
        buffer reused tensor after tensor (no fresh allocation a step: on the CPU each would cost page
        faults) and applied at once with the fused momentum kernel. The trust ratio stays a tensor:
        nothing is read on the host (the same step runs on a GPU with ``foreach=False``)."""
        wd, adapt = group["weight_decay"], group["lars_adapt"]
        bufs = self._momentum_buffers(params) if group["momentum"] != 0 else [None] * len(params)
        scratch = self._scratch(params)
        for p, buf in zip(params, bufs):
            update = p.grad
            if (wd != 0 or adapt) and p.dtype != scratch.dtype:  # a group of mixed dtypes: this one allocates
                update = p.grad.add(p, alpha=wd)
            elif wd != 0 or adapt:
                update = scratch[: p.numel()].view_as(p)
                if wd != 0:
                    torch.add(p.grad, p, alpha=wd, out=update)
                else:
                    update.copy_(p.grad)
            if adapt:
                update.mul_(self._trust(group, torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)))
            self._apply(group, [p], [update], [] if buf is None else [buf])

    def _scratch(self, params: list[torch.Tensor]) -> torch.Tensor:
        largest = max(params, key=torch.Tensor.numel)
        held = getattr(self, "_scratch_buffer", None)
        if held is None or held.numel() < largest.numel() or held.dtype != largest.dtype or \
                held.device != largest.device:
            self._scratch_buffer = held = torch.empty(largest.numel(), dtype=largest.dtype, device=largest.device)
        return held


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer at learning rate ``lr`` (the schedule changes it per step)."""
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_and_norm)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient, trust_clip=cfg.trust_clip)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {cfg.name}")


def guarded_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, made a no-op on the device when ``skip`` (a 0-d float32 tensor on the
    parameters' device) is 1: weights, momentum and step counts stay as they were, and the host
    never waits for the verdict. LARS and torch's fused SGD/AdamW read ``found_inf`` (the hook
    GradScaler uses for the same purpose)."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
