"""Where one rank's step time goes, without asking the host for anything per step.

A step is cut at four marks: the batch in hand, the loss called (its gather of negatives), the
optimizer step starting and ending. On the CPU a mark is the host clock; on CUDA it is an event
recorded on the stream, read at the log step (which waits for the device anyway). From the marks of
a window's steps: the own forward, the loss with its gather, the backward (with DDP's gradient
all-reduce), the optimizer, and the host's step time p50/p95 (batch in hand to the step's return:
on CUDA the time to queue it, unless the queue is full).

The own forward is this rank's work alone, which no other rank can slow: the batch in hand to the
loss, less the time spent in the forward's collectives (SyncBatchNorm's all-reduce of statistics
in every layer, where a rank waits for the slowest: ``collective`` times each). On the CPU every
collective of every step is timed (a host clock read costs nothing). On a GPU a timed collective is
two CUDA events (about 110 a step on a ResNet-50), so every step times only its first collective,
where a rank waits for the others to arrive (a late rank: its data, its logging), and one sampled
step a window (its first) times the rest, which run in lockstep; the other steps subtract those.
Under torch.compile the collectives inside the compiled model are not timed, and the own forward
includes their waits.

The own backward is the same idea after the loss: from the loss's return to this rank's last
gradient accumulated (a hook on each parameter; DDP's all-reduce of the last buckets, and the wait
for the slowest rank there, come after it), less the backward's collectives (SyncBatchNorm's
all-reduce of gradient sums in every layer), timed by the same rule. On a GPU the gradient hooks
record only in the sampled step (a ResNet-50 has 161 parameters), so the own backward is that step's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import numpy as np
import torch

# the phases a window reports, in ms per step: (name, from mark, to mark)
PHASES = (("own_ms", "batch", "loss"), ("loss_ms", "loss", "backward"),
          ("backward_ms", "backward", "optimizer"), ("own_backward_ms", "backward", "grads_done"),
          ("optimizer_ms", "optimizer", "optimizer_done"))


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._current: dict[str, Any] | None = None  # the marks of the step in progress; None outside steps
        self._waits: list[tuple[Any, Any]] = []  # its collectives before the loss: (start, end)
        self._back_waits: list[tuple[Any, Any]] = []  # its collectives in the backward
        self._sampling = False  # every collective of this step is timed (CPU: always; CUDA: the window's first)
        self._last: Any = None  # the newest CUDA event, waited for before the window is read
        self._started = 0.0
        self.reset()

    def reset(self) -> None:
        # (marks, forward waits, backward waits, every collective timed)
        self._steps: list[tuple[dict[str, Any], list[tuple[Any, Any]], list[tuple[Any, Any]], bool]] = []
        self._host_ms: list[float] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._last = event
            return event
        return time.perf_counter()

    def mark(self, name: str) -> None:
        """Mark ``name`` in the step in progress (the first time only; outside steps nothing)."""
        if self._current is not None and name not in self._current:
            self._current[name] = self._now()

    def _in_backward(self) -> bool:
        return self._current is not None and "backward" in self._current and "optimizer" not in self._current

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Time a collective of the forward (before the loss) or of the backward, to leave out of
        the own forward or backward."""
        waits = (None if self._current is None or torch.compiler.is_compiling() else self._waits
                 if "loss" not in self._current else self._back_waits if self._in_backward() else None)
        if waits is None or (waits and not self._sampling):  # unsampled: only the step's first one
            yield
            return
        start = self._now()
        yield
        waits.append((start, self._now()))

    def start_step(self) -> None:
        self._started = time.perf_counter()
        self._sampling = not self.cuda or not self._steps
        self._current, self._waits, self._back_waits = {"batch": self._now()}, [], []

    def end_step(self) -> None:
        if self._current is None:
            return
        self._host_ms.append((time.perf_counter() - self._started) * 1000)
        self._steps.append((self._current, self._waits, self._back_waits, self._sampling))
        self._current, self._sampling = None, False

    def timing_loss(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``loss_fn``, marking when it is called and when it returns (the backward starts)."""
        @wraps(loss_fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.mark("loss")
            out = loss_fn(*args, **kwargs)
            self.mark("backward")
            return out
        return timed

    def watch_collectives(self, model: torch.nn.Module) -> None:
        """Let ``model``'s SyncBatchNorm layers time their forward all-reduce here."""
        from trainer.model.sync_batchnorm import SyncBatchNorm

        for module in model.modules():
            if isinstance(module, SyncBatchNorm):
                module.step_clock = self

    def watch_gradients(self, model: torch.nn.Module) -> None:
        """Mark each step's last gradient accumulated (``grads_done``): the own backward's end."""
        def accumulated(_: torch.Tensor) -> None:
            if self._in_backward() and (self._sampling or not self.cuda):
                self._current["grads_done"] = self._now()  # type: ignore[index]  # the latest, not the first

        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(accumulated)

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark the optimizer's step (torch's step hooks: nothing is wrapped)."""
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.register_step_pre_hook(lambda *_: self.mark("optimizer"))
            optimizer.register_step_post_hook(lambda *_: self.mark("optimizer_done"))

    def _between(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def _ms(self, marks: dict[str, Any], waits_ms: float, start: str, end: str) -> float:
        if start not in marks or end not in marks:
            return float("nan")
        return max(self._between(marks[start], marks[end]) - waits_ms, 0.0)  # (the sampled waits are an estimate)

    @staticmethod
    def _typical_own_work(per_step: dict[str, np.ndarray], own_backward_ms: float) -> float:
        """The median over steps of own forward + own backward + optimizer: a rank's own work in its
        typical step. A step whose backward was not timed (CUDA: all but the sampled one) counts the
        window's."""
        if not len(per_step["own_ms"]):
            return float("nan")
        backward = np.where(np.isnan(per_step["own_backward_ms"]),
                            0.0 if own_backward_ms != own_backward_ms else own_backward_ms, per_step["own_backward_ms"])
        work = per_step["own_ms"] + backward + np.nan_to_num(per_step["optimizer_ms"])
        return float(np.nanmedian(work)) if not np.isnan(work).all() else float("nan")

    def window(self) -> dict[str, float]:
        """The window's figures (ms per step, mean over its steps; host p50/p95); NaN where no step
        was timed. Reading CUDA events waits for the last one: call at log steps only."""
        if self.cuda and self._last is not None:
            self._last.synchronize()

        def waited(waits: list[tuple[Any, Any]]) -> list[float]:
            return [self._between(a, b) for a, b in waits]

        # the collectives after the first, as the sampled step waited in them (0 if none was sampled)
        rest_ms = next((sum(waited(waits)[1:]) for _, waits, _, sampled in self._steps if sampled), 0.0)
        back_rest_ms = next((sum(waited(back)[1:]) for _, _, back, sampled in self._steps if sampled), 0.0)
        figures, per_step = {}, {}
        for name, start, end in PHASES:
            values = []
            for marks, waits, back, sampled in self._steps:
                left_out = (sum(waited(waits)) + (0.0 if sampled else rest_ms) if name == "own_ms" else
                            sum(waited(back)) + (0.0 if sampled else back_rest_ms) if name == "own_backward_ms" else
                            0.0)
                values.append(self._ms(marks, left_out, start, end))
            per_step[name] = np.array(values, dtype=float)
            figures[name] = float(np.nanmean(values)) if values and not np.isnan(values).all() else float("nan")
        figures["own_work_ms_p50"] = self._typical_own_work(per_step, figures["own_backward_ms"])
        host = np.array(self._host_ms) if self._host_ms else np.array([np.nan])
        figures["step_ms_p50"], figures["step_ms_p95"] = (float(np.percentile(host, q)) for q in (50, 95))
        return figures
