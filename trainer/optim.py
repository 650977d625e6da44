"""Optimizers: LARS (foreach), SGD and AdamW, with SimCLR's parameter groups."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.config import OptimConfig


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


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al., 2017) with heavy-ball momentum.

    For each adapted tensor: ``trust = eta * |w| / (|g| + wd * |w| + eps)`` (1 where either norm
    is 0), optionally clipped LARC-style to ``min(trust / lr, 1)``; the update direction is
    ``(g + wd * w) * trust``, accumulated in a momentum buffer and applied with ``lr``.
    Groups with ``lars_adapt=False`` take plain momentum SGD. All work is done with
    ``torch._foreach_*`` over a whole group: no per-parameter Python loop in the step.
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
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        trust_clip=trust_clip, eps=eps, lars_adapt=True)
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
            grads = [p.grad for p in params]
            wd, lr = group["weight_decay"], group["lr"]
            update = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
            if group["lars_adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = group["trust_coefficient"] * w_norm / (g_norm + w_norm * wd + group["eps"])
                trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                if group["trust_clip"]:
                    trust = torch.clamp(trust / lr, max=1.0)
                update = torch._foreach_mul(update, list(trust.unbind()))
            if group["momentum"] != 0:
                bufs = []
                for p in params:  # state lookup only; the arithmetic below is fused per group
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, update)
                update = bufs
            torch._foreach_add_(params, update, alpha=-lr)
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer at learning rate ``lr`` (the schedule changes it per step)."""
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_and_norm)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient, trust_clip=cfg.trust_clip)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {cfg.name}")
