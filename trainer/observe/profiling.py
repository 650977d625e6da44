"""Profiler traces on demand: ``train.profile.steps=[START,END]`` runs ``torch.profiler`` over those
steps on the ranks in ``train.profile.ranks`` and writes one gzipped Chrome/Perfetto trace per rank
to ``RUN_DIR/profile/`` (open it in https://ui.perfetto.dev or chrome://tracing); on CUDA also a
memory snapshot of the same steps (https://pytorch.org/memory_viz). Outside those steps nothing is
installed: the profiler exists only while it records."""

from __future__ import annotations

import gzip
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from foundation.atomic_files import atomic_write
from foundation.logs import get_logger
from foundation.resume_policy import setting
from trainer.runtime.run_files import optional_output

log = get_logger()


@dataclass
class ProfileConfig:
    steps: list[int] = setting(factory=list)  # [START, END]: profile steps START+1..END (a step's number is its count)
    ranks: list[int] = setting(factory=lambda: [0])  # the ranks that record (each writes its own trace)
    record_shapes: bool = setting(False)  # input shapes of each operator (bigger traces)
    with_stack: bool = setting(False)  # Python stacks of each operator (much bigger traces)

    def problems(self) -> list[tuple[str, object, str]]:
        if not self.steps:
            return []
        ok = len(self.steps) == 2 and 0 <= self.steps[0] < self.steps[1]
        return [] if ok else [("train.profile.steps", self.steps,
                               "give [START, END] with 0 <= START < END, e.g. [10, 13]: steps 11 to 13")]


class StepProfiler:
    """Starts ``torch.profiler`` before step START+1 and writes the trace after step END, on a
    profiled rank; on any other rank, or when no steps are asked for, each call is one comparison.
    A job that starts inside the window (a resume) records from its first step; a job stopped inside
    it writes the steps recorded so far (``close``)."""

    def __init__(self, cfg: ProfileConfig, rank: int, device: torch.device, run_dir: Path) -> None:
        self.cfg, self.device, self.run_dir, self.rank = cfg, device, Path(run_dir), rank
        self.start, self.end = (cfg.steps[0], cfg.steps[1]) if cfg.steps and rank in cfg.ranks else (-1, -1)
        self._profiler: torch.profiler.profile | None = None
        self._first = self._last = -1  # steps done when recording began, and at its last step
        self._written = False  # one recording a job

    def before_step(self, step: int) -> None:
        """``step``: the steps done so far (the next one is step + 1)."""
        if self._profiler is not None or self._written or not self.start <= step < self.end:
            return
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # its start/stop lines are not ours to show
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            # Python stacks only: torch's default ("all") symbolises C++ frames at the dump, for minutes
            torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                                with_stack=self.cfg.with_stack)
        self._profiler.__enter__()
        self._first = self._last = step

    def after_step(self, step: int) -> list[Path]:
        """After step ``step``: at END, stop recording and write the files; returns them."""
        if self._profiler is None:
            return []
        self._last = step
        return self._write() if step == self.end else []

    def _write(self, note: str = "") -> list[Path]:
        """Stop recording and write the steps recorded (``_first``+1 .. ``_last``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profiler, self._profiler, self._written = self._profiler, None, True
        profiler.__exit__(None, None, None)
        steps = f"steps {self._first + 1}-{self._last}"
        out = self.run_dir / "profile" / f"rank{self.rank}_steps{self._first + 1}-{self._last}"
        files = []
        if self._last > self._first:
            # optional outputs: a file in the way or a full disk costs the trace, never the run
            with optional_output(f"the profiler's trace of {steps} (train.profile)", self.run_dir):
                out.parent.mkdir(exist_ok=True)  # not its parents: a moved run folder is not made again
                trace = out.with_suffix(".trace.json.gz")
                with tempfile.TemporaryDirectory() as tmp:  # written whole: rank 0 may be uploading the folder
                    profiler.export_chrome_trace(f"{tmp}/trace.json")
                    atomic_write(trace, gzip.compress(Path(f"{tmp}/trace.json").read_bytes()))
                files.append(trace)
            if self.device.type == "cuda":
                with optional_output(f"the CUDA memory snapshot of {steps} (train.profile)", self.run_dir):
                    snapshot = out.with_suffix(".memory.pickle")
                    torch.cuda.memory._dump_snapshot(str(snapshot))
                    files.append(snapshot)
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)
        if files:
            log.info(f"profile of {steps}{note}: {', '.join(str(f) for f in files)} (open the trace in "
                     "https://ui.perfetto.dev or chrome://tracing)")
        elif self._last == self._first:
            log.warning(f"the run stopped before the first profiled step (train.profile.steps={self.cfg.steps}): "
                        "no trace")
        return files

    def close(self) -> list[Path]:
        """A run that stopped inside the profiled steps: the steps recorded so far are written."""
        if self._profiler is None:
            return []
        return self._write(f" (the run stopped inside train.profile.steps={self.cfg.steps}: a part of the window)")
