"""Learning-rate scaling with the global batch, linear warm-up, cosine decay; stepped per iteration."""

from __future__ import annotations

import math

from trainer.model.optim import OptimConfig


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """SimCLR's rules: ``linear`` = base x B/256, ``sqrt`` = base x sqrt(B), ``none`` = base."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choose linear, sqrt or none")


class WarmupCosine:
    """lr(step) for step in [0, total_steps): linear ramp to ``peak`` over ``warmup_steps``
    (the first step already moves, at peak/warmup), then cosine from peak down to
    ``peak * final_fraction`` (or constant when ``cosine`` is False)."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, final_fraction: float = 0.0,
                 cosine: bool = True) -> None:
        if total_steps <= 0:
            raise ValueError("total_steps must be positive")
        self.peak, self.total, self.final = peak, total_steps, peak * final_fraction
        self.warmup = min(warmup_steps, total_steps)
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if not self.cosine:
            return self.peak
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        return self.final + 0.5 * (self.peak - self.final) * (1 + math.cos(math.pi * progress))


def build_schedule(cfg: OptimConfig, global_batch: int, steps_per_epoch: int, epochs: int) -> WarmupCosine:
    peak = scaled_lr(cfg.lr, global_batch, cfg.lr_scaling)
    return WarmupCosine(peak, total_steps=steps_per_epoch * epochs,
                        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                        final_fraction=cfg.final_lr_fraction, cosine=cfg.schedule == "cosine")
