"""Steps the optimizer skipped (a non-finite loss, an fp16 overflow), counted on the device with no
host read per step; a streak of non-finite losses ends the run with its last good checkpoint intact."""

from __future__ import annotations

import torch

from trainer.run.parts import TrainParts
from trainer.run.step import StepOutcome


class NonFiniteLossError(RuntimeError):
    pass


class SkipCounters:
    """Skipped steps, counted on the device (no host read per step): non-finite losses, the
    current streak of them, fp16 overflows. ``check`` reads them (at log windows and checkpoints)."""

    def __init__(self, parts: TrainParts) -> None:
        self.parts = parts
        self.counts = torch.zeros(3, device=parts.info.device)  # nonfinite, streak, overflow

    def add(self, outcome: StepOutcome) -> None:
        nonfinite, streak, overflow = self.counts.unbind()
        nonfinite += outcome.skipped
        streak.add_(outcome.skipped).mul_(outcome.skipped)  # +1 on a skipped step, back to 0 on a good one
        overflow += outcome.overflow

    def totals(self) -> tuple[int, int]:
        nonfinite, _, overflow = (int(v) for v in self.counts.tolist())
        return nonfinite, overflow

    def check(self, step: int) -> int:
        """The current streak of skipped steps (a host read). A streak of
        ``precision.max_consecutive_nonfinite`` ends the run: the MLflow run marked FAILED, the
        last good checkpoint intact."""
        streak = int(self.counts[1].item())
        if streak >= self.parts.cfg.precision.max_consecutive_nonfinite:
            self.parts.tracker.finish("FAILED")
            raise NonFiniteLossError(
                f"{streak} consecutive steps had a non-finite loss (found at step {step}); the last good "
                f"checkpoint in {self.parts.checkpointer.directory} is intact. Lower optim.lr, raise "
                "loss.temperature or use precision.dtype=bf16/fp32, then resume.")
        return streak
