"""The training metrics of one logging window: loss and accuracy summed on the device (no host
sync per step), averaged over ranks when logged; wall time and the share of it spent waiting
for data."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Batch = TypeVar("Batch")


# MLflow's charts group metrics by the name before "/": the training itself, speed, the data, the
# online probe, the kNN monitor, an evaluation (system/ is MLflow's own). Runs recorded before the
# grouping used the plain names on the left; whatever reads a run's metrics reads both.
FORMER_NAMES = {"loss": "train/loss", "contrastive_acc": "train/contrastive_acc", "lr": "train/lr",
                "epoch": "train/epoch", "skipped_nonfinite": "train/skipped_nonfinite",
                "skipped_overflow": "train/skipped_overflow", "images_per_s": "perf/images_per_s",
                "data_wait_fraction": "perf/data_wait_fraction", "peak_memory_mb": "perf/peak_memory_mb",
                "skipped_corrupt_images": "data/skipped_corrupt_images", "online_probe_top1": "probe/train_top1",
                "online_probe_val_top1": "probe/val_top1", "knn_top1": "knn/top1"}


def current_names(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row (a run's or one recorded before the grouping) under today's names."""
    return {FORMER_NAMES.get(key, key): value for key, value in row.items()}


class MetricsWindow:
    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.accuracy_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.accuracy_sum.zero_()
        self.steps, self.data_wait_s, self.started = 0, 0.0, time.perf_counter()
        self.longest_wait_s = 0.0

    def timed(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """``batches``, counting the time spent waiting for each one as data wait."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - start
            self.data_wait_s += waited
            self.longest_wait_s = max(self.longest_wait_s, waited)
            yield batch

    def add(self, loss: torch.Tensor, accuracy: torch.Tensor, skipped: torch.Tensor) -> None:
        """One step, on the device; a skipped step (``skipped`` 1.0) counts in the average as a step
        without loss (its non-finite loss is dropped, not added)."""
        self.steps += 1
        keep = skipped == 0
        self.loss_sum += torch.where(keep, loss, 0.0)
        self.accuracy_sum += torch.where(keep, accuracy, 0.0)

    def summary(self, images_per_step: int) -> dict[str, float]:
        """Loss and contrastive accuracy averaged over the window's steps and every rank (a
        collective: all ranks call it at the same step), throughput and data-wait share."""
        stats = torch.stack([self.loss_sum, self.accuracy_sum]) / max(1, self.steps)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        loss, accuracy = stats.tolist()
        elapsed = time.perf_counter() - self.started
        return {"train/loss": loss, "train/contrastive_acc": accuracy,
                "perf/images_per_s": images_per_step * self.steps / elapsed,
                "perf/data_wait_fraction": self.data_wait_s / elapsed}
