"""The run as its tracking sees it, on rank 0: its start (the job's config file, params, tags, the
description on its MLflow page, the data it trains on, the changes a resume made, the start block)
and its finish (the encoder exported and logged, the curves and traces, the verdict, the end
status). ``trainer.run.loop`` calls ``start_tracking`` and ``finish_run``; the loop itself only logs
metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.sources import data_fingerprint, typical_image_size
from foundation.logs import get_logger
from trainer.config import config_to_dict, dump_config
from trainer.evaluation.export import log_encoder_model, save_encoder
from trainer.observe.plots import plot_curves
from trainer.run.parts import TrainParts
from trainer.runtime.run_files import atomic_write_text, optional_output
from trainer.state.resume import ResumeChanges, describe_changes
from trainer.tracking import Tracker, dataset_input, read_metrics_file, run_params

log = get_logger()


def start_tracking(parts: TrainParts, resumed: bool) -> None:
    """On rank 0, once the checkpoint is loaded: the job's config file, then the tracking run started
    (a new one) or continued (the checkpoint's), its params, tags and description, the data it
    trains on, the changes a resume made, and the start block that says where everything is."""
    state, world = parts.train_state, parts.info.world_size
    cfg, config_file, step = parts.cfg, parts.run_dir / "config.yaml", state.step
    parts.run_dir.mkdir(parents=True, exist_ok=True)
    changes = parts.checkpointer.changes
    # config.yaml is what the run started with; a resume that changes something keeps its own beside it
    first = not resumed or state.parent_folder is not None or not config_file.exists()
    job_config = config_file if first else parts.run_dir / f"config.step_{step:09d}.yaml"
    if first or changes:
        atomic_write_text(job_config, dump_config(cfg))
    params = run_params(config_to_dict(cfg), world, parts.loader.backend, parts.steps_per_epoch)
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
    if (parts.run_dir / "ranks.jsonl").exists():  # every rank's window figures (trainer.observe.bottlenecks)
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
