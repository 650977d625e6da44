"""The training metrics of one logging window: loss and accuracy summed on the device (no host
sync per step), averaged over ranks when logged; wall time and the share of it spent waiting
for data; every rank's own figures, gathered with them (``trainer.observe.bottlenecks`` reads them).

The wait for each pass's first batch (the job's, and each epoch's: the loader starts its workers
or its pipeline then) is the loader starting, not the loader keeping pace: it is reported apart
(``startup_wait_ms``), and ``data_wait_fraction`` is the steady-state share of the rest."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

from foundation.collectives import gather_rows
from trainer.runtime.device import peak_memory_mb

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


def own_work_ms(row: dict[str, float]) -> float:
    """A rank's own work per step in a window row: its forward and backward less their collectives,
    and its optimizer step (after the gradients' all-reduce), which no other rank can slow
    (``trainer.observe.step_clock``). NaN when the forward is not timed (torch.compile)."""
    backward = row.get("own_backward_ms", float("nan"))
    return row["own_ms"] + (backward if backward == backward else 0.0) + row.get("optimizer_ms", 0.0)


def typical_step_ms(row: dict[str, float]) -> tuple[float, float]:
    """A rank's data wait and own work in its window's typical step (the median over its steps), the
    figures a straggler is judged by: a rank slow in most steps is a straggler, one hiccup (a
    process scheduled out on a busy host, a collection pause) is not. Rows without them (a clock
    that timed no step): the window's means."""
    return (row.get("data_wait_ms_p50", row["data_wait_fraction"] * row["window_ms"]),
            row.get("own_work_ms_p50", own_work_ms(row)))


class MetricsWindow:
    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.accuracy_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.accuracy_sum.zero_()
        self.steps, self.data_wait_s, self.started = 0, 0.0, time.perf_counter()
        self.startup_wait_s = 0.0
        self.step_waits_s: list[float] = []  # each steady-state wait, for the typical step's

    def timed(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """``batches``, counting the time spent waiting for each one: the first (the loader
        starting: making the iterator included) as start-up wait, the others as data wait."""
        start, first = time.perf_counter(), True
        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - start
            if first:
                self.startup_wait_s += waited
                first = False
            else:
                self.data_wait_s += waited
                self.step_waits_s.append(waited)
            yield batch
            start = time.perf_counter()

    def add(self, loss: torch.Tensor, accuracy: torch.Tensor, skipped: torch.Tensor) -> None:
        """One step, on the device; a skipped step (``skipped`` 1.0) counts in the average as a step
        without loss (its non-finite loss is dropped, not added)."""
        self.steps += 1
        keep = skipped == 0
        self.loss_sum += torch.where(keep, loss, 0.0)
        self.accuracy_sum += torch.where(keep, accuracy, 0.0)

    def summary(self, images_per_step: int, own: dict[str, float],
                summed: dict[str, float] | None = None) -> tuple[dict[str, float], list[dict[str, float]]]:
        """The window's job metrics and one row per rank. One all-gather (every rank calls it at the
        same step) carries each rank's loss and accuracy (averaged over ranks, as before) and its own
        figures: data-wait share, ms per step, ``own`` (``StepClock.window``) and peak memory. Speed
        figures are the median rank's, data wait and memory the worst rank's; with several ranks, the
        slowest rank (the most data wait plus own work in a typical step, ``typical_step_ms``) and the
        spread over ranks. The
        data-wait share leaves out the start-up waits (``timed``), which come as ``startup_wait_ms``.
        ``summed``: counters of this rank, reported as their sum over the ranks (same names)."""
        elapsed = time.perf_counter() - self.started
        steady = max(elapsed - self.startup_wait_s, 1e-9)
        typical_wait_ms = statistics.median(self.step_waits_s) * 1000 if self.step_waits_s else 0.0
        mine = {"data_wait_fraction": self.data_wait_s / steady, "window_ms": elapsed * 1000 / max(1, self.steps),
                "startup_wait_ms": self.startup_wait_s * 1000, "data_wait_ms_p50": typical_wait_ms, **own,
                "peak_memory_mb": peak_memory_mb(self.loss_sum.device), **(summed or {})}
        names = list(mine)
        local = torch.cat([(torch.stack([self.loss_sum, self.accuracy_sum]) / max(1, self.steps)).double(),
                           torch.tensor([mine[n] for n in names], dtype=torch.float64).to(self.loss_sum.device)])
        table = gather_rows(local).tolist()
        world = len(table)
        rows = [dict(zip(names, values[2:])) for values in table]
        metrics = {"train/loss": sum(v[0] for v in table) / world,
                   "train/contrastive_acc": sum(v[1] for v in table) / world,
                   "perf/images_per_s": images_per_step * self.steps / elapsed,
                   "perf/data_wait_fraction": max(r["data_wait_fraction"] for r in rows),
                   "perf/startup_wait_ms": max(r["startup_wait_ms"] for r in rows),
                   "perf/peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
                   **{name: sum(r[name] for r in rows) for name in summed or {}}}
        for name in ("own_ms", "loss_ms", "backward_ms", "own_backward_ms", "optimizer_ms", "step_ms_p50",
                     "step_ms_p95"):
            values = [r[name] for r in rows if r.get(name, float("nan")) == r.get(name, float("nan"))]  # not NaN
            if values:
                metrics[f"perf/{name}"] = statistics.median(values)
        if world > 1:
            # the straggler watch's measure (trainer.observe.bottlenecks): data wait and own work in a typical step
            busy = [wait + (own if own == own else 0.0) for wait, own in map(typical_step_ms, rows)]
            slowest = max(range(world), key=busy.__getitem__)
            waits, owns = [r["data_wait_fraction"] for r in rows], [r["own_ms"] for r in rows]
            metrics.update({"ranks/slowest_rank": slowest,
                            "ranks/slowest_data_wait_fraction": waits[slowest],
                            "ranks/data_wait_spread": max(waits) - min(waits)})
            if all(o == o for o in owns):
                metrics.update({"ranks/slowest_own_ms": owns[slowest], "ranks/own_ms_spread": max(owns) - min(owns)})
        return metrics, rows
