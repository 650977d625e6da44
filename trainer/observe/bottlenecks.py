"""Who holds the job back, and why: rank 0's reading of every rank's window figures.

In synchronous data parallelism every rank moves at the pace of the slowest, so the job's images/s
cannot say who is slow. What tells is how each rank spends its own time: its wait for data, and its
own work (its forward and backward less the time in their collectives, and its optimizer step,
after the gradients' all-reduce), which no other rank can slow (``trainer.observe.step_clock``). Each
log window brings one row per rank (``MetricsWindow.summary``).

- A **straggler** is a rank whose data wait or own work in its typical step (the median over the
  window's steps: one hiccup is not a slow rank) stays above ``RATIO`` x the median of
  the other ranks' (itself left out: with two ranks, the other one's), by more than ``margin_ms``,
  for ``WINDOWS`` windows in a row: named once per episode (until it keeps pace again for
  ``WINDOWS`` windows), with its host and what to try, and tagged in MLflow.
- The **verdict** (after the first epoch and at the end): data-bound when the worst rank waits for
  data more than ``DATA_BOUND`` of its steady-state time, else compute-bound with the shares of a
  step. The waits for each epoch's first batch (a loader starting its workers or pipeline, which
  on a short run would decide the verdict by themselves) are said apart, in seconds.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from foundation.collectives import gather_objects
from foundation.logs import get_logger
from trainer.observe.metrics import typical_step_ms
from trainer.runtime.run_files import append_line

log = get_logger()

RATIO, WINDOWS, DATA_BOUND = 1.25, 2, 0.10


def margin_ms(step_ms: float) -> float:
    """The least excess over the median worth a line: 1 ms, or a tenth of a step when steps are long:
    a rank that costs the job less is not worth a node's investigation, and on a busy host the
    ranks of an even run differ by chance by up to about 7% of a step for seconds at a time (two
    busy loops beside 2 ranks on 2 cores: one computed 1.4x the other, 7 ms of a 106 ms step).
    """
    return max(1.0, 0.10 * step_ms)


@dataclass
class Straggling:
    rank: int
    host: str
    cause: str  # "data" or "compute"
    value_ms: float  # its data wait or own work (forward, backward and optimizer step), ms in a typical step
    median_ms: float  # the other ranks' median
    others: int = 1  # how many other ranks
    device: str = "cuda"  # the run's device type: what to check on a slow rank

    def line(self, step: int) -> str:
        ratio = self.value_ms / self.median_ms if self.median_ms > 0 else float("inf")
        whose = "the other rank's" if self.others == 1 else "the other ranks' median"
        by = f"{ratio:.1f}x {whose}" if ratio != float("inf") else "while the others do not"
        if self.cause == "data":
            return (f"straggler: rank {self.rank} on {self.host} waits for data {by} ({self.value_ms:.1f} vs "
                    f"{self.median_ms:.1f} ms in a typical step, {WINDOWS} windows to step {step}); every rank moves "
                    "at its pace. Try: check that node's storage and page cache (a cold cache, a slow disk or mount), "
                    "more data.num_workers, packed tar shards (simclr make-shards), or exclude the node (sbatch "
                    "--exclude)")
        check = ("that device's clocks, temperature and other processes on it (nvidia-smi -q -d PERFORMANCE)"
                 if self.device == "cuda" else "that host's load and CPU frequency (other processes: top)")
        return (f"straggler: rank {self.rank} on {self.host} computes slowly: its own forward, backward and "
                f"optimizer step take {by} ({self.value_ms:.1f} vs {self.median_ms:.1f} ms in a typical step, "
                f"{WINDOWS} windows to step {step}); every rank moves at its pace. Try: check {check}, or exclude the "
                "node (sbatch --exclude)")


def find_stragglers(rows: list[dict[str, float]], hosts: list[str], device: str = "cuda") -> dict[int, Straggling]:
    """This window's slow ranks, each against the other ranks (one window: ``StragglerWatch`` asks
    for ``WINDOWS`` in a row)."""
    if len(rows) < 2:
        return {}
    waits, owns = (list(figures) for figures in zip(*(typical_step_ms(r) for r in rows)))
    margin = margin_ms(median(r["window_ms"] for r in rows))
    found = {}
    for rank, (wait, own) in enumerate(zip(waits, owns)):
        excess = {}
        for cause, value, values in (("data", wait, waits), ("compute", own, owns)):
            mid = median(values[:rank] + values[rank + 1:])  # the others': a slow rank does not lift its own bar
            if value == value and value > RATIO * mid and value - mid > margin:  # value == value: not NaN
                excess[cause] = (value - mid, value, mid)
        if excess:
            cause = max(excess, key=lambda c: excess[c][0])
            found[rank] = Straggling(rank, hosts[rank], cause, excess[cause][1], excess[cause][2], len(rows) - 1,
                                     device)
    return found


@dataclass
class StragglerWatch:
    hosts: list[str]
    device: str = "cuda"  # the run's device type (what a slow rank's line advises checking)
    streak: dict[int, tuple[str, int]] = field(default_factory=dict)  # rank -> (cause, slow windows in a row)
    named: dict[int, int] = field(default_factory=dict)  # ranks named in their episode -> windows at pace since

    def window(self, rows: list[dict[str, float]]) -> list[Straggling]:
        """The stragglers to name now: slow for ``WINDOWS`` windows in a row, not named yet in this
        episode. An episode ends when the rank keeps pace for ``WINDOWS`` windows in a row (a cold
        cache comes and goes: one good window does not make the next slow one a new straggler)."""
        found, new = find_stragglers(rows, self.hosts, self.device), []
        for rank in range(len(rows)):
            if rank not in found:
                self.streak.pop(rank, None)
                if rank in self.named:
                    self.named[rank] += 1
                    if self.named[rank] >= WINDOWS:
                        del self.named[rank]
                continue
            if rank in self.named:
                self.named[rank] = 0
            cause = found[rank].cause
            before_cause, before = self.streak.get(rank, (cause, 0))
            count = before + 1 if before_cause == cause else 1
            self.streak[rank] = (cause, count)
            if count >= WINDOWS and rank not in self.named:
                self.named[rank] = 0
                new.append(found[rank])
        return new


PHASE_NAMES = (("own_ms", "own forward"), ("loss_ms", "loss and its gather"), ("backward_ms", "backward"),
               ("optimizer_ms", "optimizer"))


@dataclass
class Tally:
    """Every rank's figures summed over windows (weighted by their steps), for the verdict. The
    waits for a pass's first batch (the loader starting) are summed apart from the steady state."""

    steps: int = 0
    wait_ms: list[float] = field(default_factory=list)  # per rank: steady-state data wait, summed over steps
    steady_ms: list[float] = field(default_factory=list)  # per rank: wall time but the start-up waits
    startup_ms: list[float] = field(default_factory=list)  # per rank: waits for a pass's first batch
    window_ms: list[float] = field(default_factory=list)  # per rank: wall time
    phases_ms: dict[str, float] = field(default_factory=dict)  # the median rank's, summed over steps

    def add(self, rows: list[dict[str, float]], steps: int) -> None:
        if not self.wait_ms:
            self.wait_ms, self.steady_ms, self.startup_ms, self.window_ms = ([0.0] * len(rows) for _ in range(4))
        self.steps += steps
        for rank, row in enumerate(rows):
            startup, total = row.get("startup_wait_ms", 0.0), row["window_ms"] * steps
            self.wait_ms[rank] += row["data_wait_fraction"] * (total - startup)
            self.steady_ms[rank] += total - startup
            self.startup_ms[rank] += startup
            self.window_ms[rank] += total
        for name, _ in PHASE_NAMES:
            values = [row[name] for row in rows if row[name] == row[name]]
            if values:
                self.phases_ms[name] = self.phases_ms.get(name, 0.0) + median(values) * steps


def verdict(tally: Tally, when: str, data: Any, device: str, syncs: int | None, stored: str = "files") -> str:
    """One line: data-bound (the worst rank waits for data over ``DATA_BOUND`` of its steady-state
    time: the backend, workers and what to try) or compute-bound (the shares of a step), the
    loader's start-up waits apart, and the host syncs of a steady-state step. ``data`` is the
    run's ``DataConfig``, ``stored`` how its source keeps images (``Source.stored``): the advice names
    only what exists and applies on this device to this data."""
    if not tally.steps:
        return f"verdict ({when}): no step was timed"
    shares = [w / t if t > 0 else 0.0 for w, t in zip(tally.wait_ms, tally.steady_ms)]
    worst = max(range(len(shares)), key=shares.__getitem__)
    step_ms = median(tally.steady_ms) / tally.steps
    startup_s = max(tally.startup_ms) / 1000
    tail = (f"; besides, {startup_s:.1f} s waiting for each epoch's first batch (the loader starting; not in the "
              "share above)" if startup_s >= 0.05 else "")
    tail += "" if syncs is None else f"; host syncs in a steady-state step: {syncs}"
    where = f" (rank {worst})" if len(shares) > 1 else ""
    if shares[worst] > DATA_BOUND:
        backend = data.backend if data.backend != "auto" else ("dali" if device == "cuda" else "torchvision")
        unit = "CPU threads" if backend == "dali" else "workers"
        workers = ("loading in the training process (data.num_workers=0)" if data.num_workers == 0 and
                   backend == "torchvision" else f"{data.num_workers} {unit} per rank")
        tries = ["data.backend=dali (decoding and augmenting on the GPU)"] if device == "cuda" and backend != "dali" \
            else []
        tries.append(f"more data.num_workers (this host has {os.cpu_count()} CPUs)")
        if device == "cuda" and stored == "decoded" and not data.on_device:
            tries.append("data.on_device=true when the images fit in device memory (DALI)")
        if stored == "files":
            tries.append("packed tar shards (simclr make-shards) when reading many small files from network storage")
        return (f"verdict ({when}): data-bound: the ranks wait for data {shares[worst]:.0%} of their time{where}; "
                f"{backend} backend, {workers}, {step_ms:.1f} ms per step. Try: " + "; ".join(tries) + tail)
    parts = ", ".join(f"{label} {tally.phases_ms[name] / tally.steps / step_ms:.0%}" for name, label in PHASE_NAMES
                      if name in tally.phases_ms and step_ms > 0)
    return (f"verdict ({when}): compute-bound: the ranks wait for data {shares[worst]:.0%} of their time{where}; "
            f"of a {step_ms:.1f} ms step: {parts or 'no phase timed'} (the rest: the loop, and waiting for the slowest "
            f"rank){tail}")


class Bottlenecks:
    """Rank 0's watch over the run's windows: every rank's rows into ``RUN_DIR/ranks.jsonl``,
    stragglers named (and tagged), the verdict after the first epoch and at the end. Built on every
    rank (the hosts are gathered once, a collective); only rank 0 reads the windows."""

    def __init__(self, run_dir: str | Path, data: Any, device_type: str, is_main: bool, stored: str = "files") -> None:
        hosts = gather_objects(socket.gethostname())
        self.file, self.data, self.device_type, self.is_main = Path(run_dir) / "ranks.jsonl", data, device_type, is_main
        self.watch, self.tally, self.stored = StragglerWatch(hosts, device_type), Tally(), stored
        self.syncs: int | None = None  # host syncs counted in one steady-state step of this job
        self.first_epoch_said = False

    def window(self, rows: list[dict[str, float]], steps: int, step: int, tracker: Any) -> None:
        if not self.is_main:
            return
        for rank, row in enumerate(rows):
            append_line(self.file, json.dumps({"step": step, "rank": rank, "host": self.watch.hosts[rank], **row}))
        self.tally.add(rows, steps)
        for slow in self.watch.window(rows):
            log.warning(slow.line(step))
            tracker.set_tags({f"simclr.straggler.rank{slow.rank}": slow.line(step).split(": ", 1)[1][:500]})

    def verdict(self, when: str) -> str:
        return verdict(self.tally, when, self.data, self.device_type, self.syncs, self.stored)
