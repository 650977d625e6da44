"""The training entry point: every launcher (``simclr train``, torchrun, the SLURM job) calls ``train``.

``train`` builds the run's parts (``trainer.run.parts``), resumes or starts the MLflow run, then loops:
one ``train_step`` per batch, a metrics window logged every ``train.log_every`` steps, checkpoints
every ``checkpoint.every_steps``, and ``finish_run`` at the end.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

from foundation.collectives import agree_any, on_rank_zero
from foundation.logs import get_logger, run_log_file
from trainer import STOPPED_AT_START
from trainer.config import Config
from trainer.evaluation.evaluate import knn_monitor, probe_val_top1
from trainer.observe.device_syncs import DeviceSyncCounter
from trainer.observe.metrics import MetricsWindow
from trainer.run.parts import TrainParts, build_parts
from trainer.run.run_tracking import finish_run, start_tracking
from trainer.run.skip_counters import SkipCounters
from trainer.run.step import StepOutcome, train_step
from trainer.runtime.distributed import DistInfo, init_distributed, teardown
from trainer.runtime.run_files import (
    RunFileError,
    RunFolderGoneError,
    RunFolderInUseError,
    RunFolderLock,
    check_own_files,
    check_run_dir,
)
from trainer.state.checkpoint import CheckpointError
from trainer.tracking import Tracker, check_store_uri
from trainer.tracking.sink import check_sinks

log = get_logger()


@dataclass
class TrainResult:
    step: int
    loss: float
    run_dir: Path
    run_id: str | None
    encoder_path: Path | None
    preempted: bool = False
    skipped_nonfinite: int = 0
    skipped_overflow: int = 0

    @property
    def exit_code(self) -> int:
        """0 when the run trained (or was pre-empted and checkpointed), 1 when it did nothing."""
        return 0 if self.step > 0 or self.preempted else 1


def preflight(cfg: Config) -> None:
    """What the config's values cannot say: whether the run folder can be the run's (a folder of its
    own, writable), the tracking sinks exist (a sink of the user's own is imported by its name) and
    the tracking store is one MLflow opens. Each check lives with what it checks;
    train runs them before anything starts, and the launchers before they start ranks or queue a job."""
    check_run_dir(cfg.train.run_dir, cfg.data.root, cfg.data.val_root)
    check_sinks(cfg.tracking.sinks)
    if cfg.tracking.enabled:
        check_store_uri(cfg.tracking.uri)


def train(cfg: Config, stop: threading.Event | None = None,
          on_start: Callable[[Tracker, DistInfo], None] | None = None, launched: bool = False) -> TrainResult:
    """Pretrain SimCLR with the resolved ``cfg`` in this process (one rank of the job).

    Setting ``stop`` (a signal handler does, on pre-emption) makes every rank checkpoint and return
    at the next step boundary. ``on_start(tracker, info)`` runs once the MLflow run exists.
    ``launched``: a rank of our local launcher, which names a missing rank and says how the job ended.
    """
    preflight(cfg)
    info = init_distributed(cfg.dist, cfg.train.device, launched=launched, run_dir=Path(cfg.train.run_dir))
    lock = RunFolderLock(cfg.train.run_dir)  # one run per folder, for the run's life; the writer (rank 0) holds it
    stack = contextlib.ExitStack()
    try:
        on_rank_zero(lambda: (lock.acquire(), check_own_files(cfg.train.run_dir)), (RunFolderInUseError, RunFileError))
        if info.is_main:  # the run's own log, beside its metrics (rank 0 holds the folder now)
            stack.enter_context(run_log_file(cfg.train.run_dir))
        parts = build_parts(cfg, info)
        stack.callback(parts.loader.close)  # DALI's pipelines shut down here, not in its clean-up at exit
        parts.folder_lock = lock
        try:
            return run_training(parts, stop or threading.Event(), on_start)
        except BaseException as exc:  # the MLflow run must not stay RUNNING, whatever ended it
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            gone = exc if isinstance(exc, RunFolderGoneError) else lock.moved_away(exc)
            if gone is not None:  # nothing more is written where the folder was
                parts.tracker.detach_run_folder()
                parts.tracker.set_tags({"simclr.failure": str(gone)[:500]})
            parts.tracker.finish(status)
            if parts.info.is_main and parts.tracker.run_id and not launched:  # else the launcher says it, once
                log.warning(f"{parts.tracker.describe()} ended {status}")
            if gone is not None and gone is not exc:
                raise gone from None
            raise
    finally:
        stack.close()
        lock.release()
        teardown()


def run_training(parts: TrainParts, stop: threading.Event,
                 on_start: Callable[[Tracker, DistInfo], None] | None = None) -> TrainResult:
    cfg = parts.cfg
    if stop_before_start(parts, stop):  # Ctrl-C during start-up: no MLflow run, no step
        return TrainResult(0, float("nan"), parts.run_dir, None, None, preempted=True)
    step = start_run(parts)
    if stop_before_start(parts, stop):  # Ctrl-C while the MLflow run was created: still no step
        if step == 0:
            parts.tracker.discard()  # a new run that never trained: its MLflow run and record go
        else:
            parts.tracker.finish("KILLED")
        return TrainResult(step, float("nan"), parts.run_dir, None, None, preempted=True)
    if step >= parts.schedule.total:  # a finished run run again: nothing to train, export or log twice
        encoder = parts.run_dir / "encoder.pt"
        if parts.info.is_main:
            log.info(f"the run in {parts.run_dir} already finished (step {step}/{parts.schedule.total}); nothing "
                     f"to do. Its encoder: {encoder}. To train again, use a new train.run_dir, or "
                     "checkpoint.resume=none train.overwrite=true")
        return TrainResult(step, float("nan"), parts.run_dir, parts.tracker.run_id,
                           encoder if encoder.exists() else None)
    if on_start is not None:
        on_start(parts.tracker, parts.info)
    stop_at = min(parts.schedule.total, cfg.train.stop_after_steps or parts.schedule.total)
    asked, world = cfg.train.profile.steps, parts.info.world_size
    outside = [r for r in cfg.train.profile.ranks if not 0 <= r < world]
    if asked and parts.info.is_main and outside:
        log.warning(f"train.profile.ranks={cfg.train.profile.ranks}: this job has {world} rank(s) (0..{world - 1}), "
                    f"so rank(s) {outside} record nothing; name ranks below {world}")
    if asked and parts.info.is_main and (asked[1] <= step or asked[0] >= stop_at):  # else it would record nothing
        log.warning(f"train.profile.steps={asked} is not within this job's steps {step + 1}..{stop_at}: nothing will "
                    f"be profiled; give [START, END] with {step} <= START < END <= {stop_at}")
    elif asked and parts.info.is_main and (asked[0] < step or asked[1] > stop_at):  # a part of it: said, recorded
        log.info(f"train.profile.steps={asked} overlaps this job's steps {step + 1}..{stop_at}: steps "
                 f"{max(asked[0], step) + 1}-{min(asked[1], stop_at)} will be profiled")
    shown = parts.info.is_main and cfg.train.progress_bar
    bar = tqdm(total=stop_at, initial=step, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not shown)
    try:
        with printed_above(bar if shown else None):
            step, last_loss, preempted, skips = train_loop(parts, stop, step, stop_at, bar)
    finally:
        parts.profiler.close()  # stopped inside the profiled steps: recording ends
        bar.close()  # ends the bar's line: a message that follows (an error too) starts on its own line
    encoder_path = finish_run(parts, step, preempted)
    return TrainResult(step, last_loss, parts.run_dir, parts.tracker.run_id, encoder_path, preempted,
                       *skips.totals())


@contextmanager
def printed_above(bar: tqdm | None) -> Iterator[None]:
    """While the progress bar is shown, every print (ours, MLflow's warnings, a signal's notice) goes
    above it on a line of its own, never glued to the bar's line."""
    if bar is None:
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = DummyTqdmFile(out), DummyTqdmFile(err)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        sys.stdout, sys.stderr = out, err


def train_loop(parts: TrainParts, stop: threading.Event, step: int, stop_at: int,
               bar: tqdm) -> tuple[int, float, bool, SkipCounters]:
    """Steps from ``step`` to ``stop_at`` (or a stop request): returns the step reached, the last
    logged loss, whether it was stopped, and the skip counters."""
    cfg, steps_per_epoch = parts.cfg, parts.steps_per_epoch
    window, skips, last_loss, preempted = MetricsWindow(parts.info.device), SkipCounters(parts), float("nan"), False
    sync_count_step = step + 2  # a steady-state step of this job (the first ones allocate): its host syncs counted
    parts.model.train()
    while step < stop_at and not preempted:
        parts.loader.set_epoch(step // steps_per_epoch, step % steps_per_epoch)
        for size_groups, labels in window.timed(parts.loader):
            parts.profiler.before_step(step)
            parts.clock.start_step()
            step_fn = counting_syncs if step == sync_count_step else train_step
            outcome = step_fn(parts, size_groups, parts.schedule(step), labels)
            parts.clock.end_step()
            skips.add(outcome)
            step += 1
            parts.profiler.after_step(step)
            window.add(outcome.loss, outcome.accuracy, outcome.skipped)
            bar.update(1)
            epoch_end, log_due = step % steps_per_epoch == 0, step % cfg.train.log_every == 0 or step == stop_at
            preempted = stop_requested(parts, stop, step)
            checkpoint_due = step % cfg.checkpoint.every_steps == 0 or step == stop_at or preempted
            if log_due or checkpoint_due or epoch_end:  # before anything is written: is the folder still ours?
                check_run_folder(parts)
            # the epoch's figures (view sizes, the online probe's) go in the same metrics row as a window ending there
            extra = epoch_metrics(parts, step // steps_per_epoch - 1) if epoch_end else {}
            if log_due:
                last_loss = log_window(parts, window, skips, step, bar, extra)
            elif extra:
                parts.tracker.log_metrics(extra, step)
            if knn_due(cfg, step, steps_per_epoch):
                log_knn_monitor(parts, step)
            # No checkpoint inside a streak of skipped steps: the last one on disk stays a healthy state.
            if checkpoint_due and not skips.check(step):
                parts.train_state.step, parts.train_state.tracking = step, parts.tracker.state_dict()
                try:
                    parts.checkpointer.save()  # every rank, at the same step
                except FileNotFoundError:  # the folder went away after this step's check: say where it is
                    if parts.info.is_main and parts.folder_lock is not None:
                        parts.folder_lock.check()
                    raise
            if step >= stop_at or preempted:
                break
    return step, last_loss, preempted, skips


def check_run_folder(parts: TrainParts) -> None:
    """Every rank stops together (``RunFolderGoneError``) when rank 0 finds the run folder moved or
    removed: a host read, at log steps and checkpoints only."""
    if parts.folder_lock is not None:
        on_rank_zero(parts.folder_lock.check, (RunFolderGoneError,))


def stop_before_start(parts: TrainParts, stop: threading.Event) -> bool:
    """Whether a stop was requested while the run's parts were built (every rank agrees): then
    nothing is started, trained or recorded, and rank 0 says so in one line."""
    if not agree_any(stop.is_set())[0]:
        return False
    if parts.info.is_main:
        print(STOPPED_AT_START, file=sys.stderr, flush=True)
    return True


def stop_requested(parts: TrainParts, stop: threading.Event, step: int) -> bool:
    """Whether to stop after ``step``. One process reads its own flag every step; ranks agree every
    ``train.stop_check_every`` steps (a small all-reduce read on the host, kept out of other steps),
    so a pre-emption notice ends the run within that many steps, checkpointed."""
    if not parts.info.distributed:
        return stop.is_set()
    if step % parts.cfg.train.stop_check_every:
        return False
    return agree_any(stop.is_set())[0]


def start_run(parts: TrainParts) -> int:
    """Resume from the newest usable checkpoint (or start fresh), then start the run's tracking, or
    continue the checkpoint's, on rank 0 (``trainer.run.run_tracking``). Returns the step to continue from."""
    resumed = parts.checkpointer.resume()
    state = parts.train_state
    parts.tracker.load_state_dict(state.tracking)
    if state.step >= parts.schedule.total:
        if not (parts.run_dir / "encoder.pt").exists():  # not finished: its schedule is shorter now
            raise CheckpointError(f"the checkpoint is at step {state.step}, past the end of this run's schedule "
                                  f"({parts.schedule.total} steps: train.epochs x {parts.steps_per_epoch} steps per "
                                  "epoch); raise train.epochs to train on, or start a new train.run_dir")
        return state.step
    if parts.info.is_main:
        start_tracking(parts, resumed)
    return state.step


def log_window(parts: TrainParts, window: MetricsWindow, skips: SkipCounters, step: int, bar: tqdm,
               extra: dict[str, float] | None = None) -> float:
    """Log the window's metrics (and ``extra``) at ``step`` (a collective), start a new window;
    returns the loss."""
    skips.check(step)
    nonfinite, overflow = skips.totals()
    summary, rows = window.summary(parts.cfg.data.batch_size, parts.clock.window(),
                                   {"data/store_retries": parts.loader.store_retries})
    metrics = {**summary, "train/lr": parts.schedule(step - 1),
               "train/epoch": step / parts.steps_per_epoch, "train/skipped_nonfinite": nonfinite,
               "train/skipped_overflow": overflow, "data/skipped_corrupt_images": parts.loader.corrupt_skipped,
               **(extra or {})}
    parts.tracker.log_metrics(metrics, step)
    parts.bottlenecks.window(rows, window.steps, step, parts.tracker)
    last = min(parts.schedule.total, parts.cfg.train.stop_after_steps or parts.schedule.total)
    if parts.info.is_main and not parts.bottlenecks.first_epoch_said and parts.steps_per_epoch <= step < last:
        parts.bottlenecks.first_epoch_said = True  # once a job, at the first window past epoch 1 (not at the end)
        log.info(parts.bottlenecks.verdict(f"at step {step}, epoch {step / parts.steps_per_epoch:.1f}"))
    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", img_s=f"{metrics['perf/images_per_s']:.0f}")
    window.reset()
    parts.clock.reset()
    return metrics["train/loss"]


def counting_syncs(parts: TrainParts, size_groups: list[torch.Tensor], lr: float,
                   labels: torch.Tensor | None) -> StepOutcome:
    """``train_step``, its host waits for the device counted by CUDA's own sync debug mode for the
    verdict (``trainer.observe.device_syncs``; on the CPU there is nothing to wait for, and none is said)."""
    counter = DeviceSyncCounter(parts.info.device)
    with counter.counting():
        outcome = train_step(parts, size_groups, lr, labels)
    parts.bottlenecks.syncs = counter.total
    return outcome


def knn_due(cfg: Config, step: int, steps_per_epoch: int) -> bool:
    every = cfg.train.knn_every_epochs
    return bool(every and cfg.data.val_root and step % (steps_per_epoch * every) == 0)


def epoch_metrics(parts: TrainParts, epoch: int) -> dict[str, float]:
    """At the end of ``epoch``: the crop size of each view group in force during it, the stall of a
    pipeline rebuilt for a new size at its start (DALI), the online probe's figures (collectives)."""
    spec = parts.loader.views
    metrics: dict[str, float] = {f"data/view_size_{i}": group.size_at(epoch, spec.image_size)
                                 for i, group in enumerate(spec.groups)}
    for at, seconds in parts.loader.rebuilds:
        if at == epoch:
            metrics["perf/pipeline_rebuild_s"] = seconds
    if parts.online_probe is not None:
        metrics.update(online_probe_metrics(parts))
    return metrics


def online_probe_metrics(parts: TrainParts) -> dict[str, float]:
    """At an epoch's end: the online probe's top-1 on that epoch's training batches and, with
    data.val_root, on the validation set, every rank scoring its share (collectives: every rank)."""
    metrics = {"probe/train_top1": parts.online_probe.epoch_top1()}
    if parts.val_source is not None:
        metrics["probe/val_top1"] = probe_val_top1(parts.model.encoder, parts.online_probe, parts.val_source,
                                                          parts.cfg.data, parts.info.device, parts.info.rank,
                                                          parts.info.world_size)
    return metrics


def log_knn_monitor(parts: TrainParts, step: int) -> None:
    """kNN top-1 of the current encoder on data.val_root, every rank extracting its share of the
    features (a collective: no rank waits idle); the datasets were opened once, by build_parts."""
    top1 = knn_monitor(parts.model.encoder, parts.loader.source, parts.val_source, parts.cfg.data, parts.info.device,
                       shard=(parts.info.rank, parts.info.world_size))
    parts.tracker.log_metrics({"knn/top1": top1}, step)
