"""The training entry point: every launcher (``simclr train``, torchrun, the SLURM job) calls ``train``.

``train`` builds the run's parts (``trainer.parts``), resumes or starts the MLflow run, then loops:
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

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

from data_pipeline.sources import data_fingerprint, typical_image_size
from foundation.collectives import agree_any, on_rank_zero
from foundation.logs import get_logger, run_log_file
from trainer import STOPPED_AT_START
from trainer.checkpoint import CheckpointError, ResumeChanges, describe_changes
from trainer.config import Config, dump_config
from trainer.device_syncs import DeviceSyncCounter
from trainer.distributed import DistInfo, init_distributed, teardown
from trainer.evaluate import knn_monitor, probe_val_top1
from trainer.export import log_encoder_model, save_encoder
from trainer.metrics import MetricsWindow
from trainer.parts import TrainParts, build_parts
from trainer.plots import plot_curves
from trainer.run_files import (
    RunFileError,
    RunFolderGoneError,
    RunFolderInUseError,
    RunFolderLock,
    atomic_write_text,
    check_own_files,
    check_run_dir,
    optional_output,
)
from trainer.step import StepOutcome, train_step
from trainer.tracking import Tracker, check_store_uri, dataset_input, read_metrics_file, run_params

log = get_logger()


class NonFiniteLossError(RuntimeError):
    pass


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
    own, writable) and the tracking store is one MLflow opens. Each check lives with what it checks;
    train runs them before anything starts, and the launchers before they start ranks or queue a job."""
    check_run_dir(cfg.train.run_dir, cfg.data.root, cfg.data.val_root)
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
            if isinstance(exc, RunFolderGoneError):  # nothing more is written where the folder was
                parts.tracker.detach_run_folder()
                parts.tracker.set_tags({"simclr.failure": str(exc)[:500]})
            parts.tracker.finish(status)
            if parts.info.is_main and parts.tracker.run_id and not launched:  # else the launcher says it, once
                log.warning(f"{parts.tracker.describe()} ended {status}")
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


def start_run(parts: TrainParts) -> int:
    """Resume from the newest usable checkpoint (or start fresh), then start the MLflow run, or
    continue the checkpoint's, on rank 0. Returns the step to continue from."""
    resumed = parts.checkpointer.resume()
    state, world = parts.train_state, parts.info.world_size
    parts.tracker.load_state_dict(state.tracking)
    if state.step >= parts.schedule.total:
        if not (parts.run_dir / "encoder.pt").exists():  # not finished: its schedule is shorter now
            raise CheckpointError(f"the checkpoint is at step {state.step}, past the end of this run's schedule "
                                  f"({parts.schedule.total} steps: train.epochs x {parts.steps_per_epoch} steps per "
                                  "epoch); raise train.epochs to train on, or start a new train.run_dir")
        return state.step
    if parts.info.is_main:
        cfg, config_file, step = parts.cfg, parts.run_dir / "config.yaml", state.step
        parts.run_dir.mkdir(parents=True, exist_ok=True)
        changes = parts.checkpointer.changes
        # config.yaml is what the run started with; a resume that changes something keeps its own beside it
        first = not resumed or state.parent_folder is not None or not config_file.exists()
        job_config = config_file if first else parts.run_dir / f"config.step_{step:09d}.yaml"
        if first or changes:
            atomic_write_text(job_config, dump_config(cfg))
        params = run_params(cfg, world, parts.loader.backend, parts.steps_per_epoch)
        history = ",".join(f"{at}:{size}" for at, size in state.world_size_history)  # step:world size
        tags = {"simclr.device": str(parts.info.device), "simclr.world_size": str(world),
                "simclr.world_size_history": history, "mlflow.note.content": describe_run(parts)}
        if state.parent_folder:
            parent_run = Tracker.run_id_in(state.parent_tracking) or ""
            tags.update({"simclr.parent_run_id": parent_run, "simclr.resumed_from": state.parent_folder})
            log.info(f"the checkpoint was written in another run folder ({state.parent_folder}); this "
                     f"folder gets an MLflow run of its own (tag simclr.parent_run_id={parent_run})")
        parts.tracker.start(params, tags)
        if state.world_size_changed:
            parts.tracker.log_params({f"world_size.from_step_{step}": world})
            if parts.loader.source.order_depends_on_world_size and step % parts.steps_per_epoch:
                log.info(f"tar shards are dealt to ranks in blocks, so the rest of epoch "
                         f"{step // parts.steps_per_epoch} follows the new split of {world} ranks (a few images of "
                         "this epoch are seen twice or not at all); from the next epoch on, each image is seen once")
        if first or changes.data:  # the data it trains on (again when a resume changed it)
            log_datasets(parts, validation=first)
        if first or changes:
            parts.tracker.log_artifact(job_config)
        if changes:
            record_changes(parts, changes, job_config)
        announce(parts, step)
    return state.step


def log_datasets(parts: TrainParts, validation: bool) -> None:
    """The training data (and, with ``validation``, data.val_root) as MLflow dataset inputs, by the
    fingerprint the resume checks use. Nothing is built without MLflow (the GPU proof runs where it
    is not installed)."""
    if not parts.tracker.takes_datasets:
        return
    inputs = [dataset_input(parts.cfg.data.root, parts.train_state.data, "training")] if parts.train_state.data else []
    if validation and parts.val_source is not None:
        inputs.append(dataset_input(parts.cfg.data.val_root, data_fingerprint(parts.val_source), "validation"))
    parts.tracker.log_datasets(inputs)


def describe_run(parts: TrainParts) -> str:
    """The run's description on its MLflow page: what was trained, on what, how."""
    cfg, source = parts.cfg, parts.loader.source
    classes = f", {len(source.classes)} classes" if source.classes else ""
    views = parts.loader.views
    sizes = views.describe(0) + (f", {views.describe(cfg.train.epochs - 1)} in the last epoch" if views.changes_size()
                                 else "")
    return (f"SimCLR {cfg.model.arch} on {cfg.data.root} ({len(source)} images{classes}): views {sizes}, "
            f"world size {parts.info.world_size}, batch {cfg.data.batch_size}, "
            f"{cfg.train.epochs} epochs ({parts.schedule.total} steps), {cfg.optim.name} lr {cfg.optim.lr:g}, "
            f"temperature {cfg.loss.temperature:g}")


def record_changes(parts: TrainParts, changes: ResumeChanges, job_config: Path) -> None:
    """A resume that changed settings, hyper-parameters (checkpoint.allow_changes) or the dataset:
    MLflow params ``changed_at_step_<N>.<key>`` = "old -> new" (params never change, so the run's
    own stay as it started) and one line."""
    at = f"changed_at_step_{changes.step}"
    params = {f"{at}.{key}": f"{old} -> {new}" for key, (old, new) in {**changes.settings, **changes.hyper}.items()}
    if changes.data:
        params[f"{at}.data"] = "; ".join(changes.data)
    parts.tracker.log_params(params)
    said = describe_changes({**changes.settings, **changes.hyper})
    log.info(f"resumed at step {changes.step} with changes: {'; '.join(said + changes.data)} (recorded in "
             f"MLflow as {at}.*; config.yaml keeps what the run started with, this job's is {job_config.name})")


def announce(parts: TrainParts, step: int) -> None:
    """Rank 0's start block: where the run writes, what it reads, and where to watch it."""
    cfg, source, world = parts.cfg, parts.loader.source, parts.info.world_size
    labels = np.asarray(source.labels)
    known = int((labels >= 0).sum())
    labelled = "labelled" if known == len(labels) else "unlabeled" if not known else f"{known} labelled"
    classes = f", {len(source.classes)} classes" if source.classes else ""
    log.info(f"run folder {parts.run_dir} ({f'resumed at step {step}' if step else 'new run'}; "
             f"{parts.schedule.total} steps in all)")
    log.info(f"data {cfg.data.root}: {len(source)} images{classes}, {labelled}; {parts.steps_per_epoch} steps "
             f"per epoch of {cfg.data.batch_size} ({world} rank(s) x {cfg.data.batch_size // world}), "
             f"{parts.loader.backend} backend on {parts.info.device}")
    for note in parts.loader.views.notes(cfg.train.epochs, typical_image_size(source)):
        log.warning(note)
    log.info(parts.tracker.describe())


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
    verdict (``trainer.device_syncs``; on the CPU there is nothing to wait for, and none is said)."""
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


def finish_run(parts: TrainParts, step: int, preempted: bool) -> Path | None:
    """On rank 0: export the encoder when the schedule is complete, plot the curves, close the
    MLflow run. Returns the exported encoder's path (None when stopped early)."""
    if not parts.info.is_main:
        return None
    total, encoder_path = parts.schedule.total, None
    if not preempted and step >= total:
        encoder_path = save_encoder(parts.model, parts.run_dir / "encoder.pt")
        parts.tracker.log_artifact(encoder_path)
        if parts.cfg.tracking.log_model:
            register_as, size = parts.cfg.tracking.register_as, parts.cfg.data.image_size
            logged = parts.tracker.log_model(lambda run: log_encoder_model(run, parts.model.encoder, size, register_as))
            parts.tracker.model_pending(None if logged else register_as)  # simclr sync logs a pending one
    # the plot never fails a run: damaged lines are left out of it, and an unwritable folder only costs it
    plot = None
    with optional_output(f"curves.png (the metrics are in {parts.tracker.local_file})", parts.run_dir):
        plot = plot_curves(read_metrics_file(parts.tracker.local_file, lenient=True), parts.run_dir / "curves.png")
    if plot is not None:
        parts.tracker.log_artifact(plot)
    # the profiled ranks' traces (another rank's, written after the run's last step, may come too late
    # for MLflow: it stays in the folder)
    for trace in sorted((parts.run_dir / "profile").glob("rank*")):
        parts.tracker.log_artifact(trace, "profile")
    if (parts.run_dir / "ranks.jsonl").exists():  # every rank's window figures (trainer.bottlenecks)
        parts.tracker.log_artifact(parts.run_dir / "ranks.jsonl")
    said = parts.bottlenecks.verdict("at the end" if step >= total else f"at step {step}, stopped")
    log.info(said)
    parts.tracker.set_tags({"simclr.verdict": said.split(": ", 1)[1][:5000]})
    if step < total:  # stopped before the schedule's end (a signal, train.stop_after_steps): not FINISHED
        why = "a stop request (signal)" if preempted else f"train.stop_after_steps={parts.cfg.train.stop_after_steps}"
        parts.tracker.set_tags({"simclr.stopped_early": f"at step {step} of {total} ({why}); resume to go on"})
    else:
        parts.tracker.delete_tags(["simclr.stopped_early"])  # an earlier job's stop, now made good
    parts.tracker.finish("FINISHED" if step >= total else "KILLED")
    log.info(f"{'stopped' if step < total else 'finished'} at step {step}/{total}; "
             f"{parts.tracker.describe()}")
    if step < total:
        log.info(f"checkpoint at step {step} in {parts.checkpointer.directory}; run the same command again "
                 "to resume (checkpoint.resume=auto)")
    return encoder_path
