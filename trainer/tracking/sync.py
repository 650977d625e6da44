"""A run folder completed in MLflow after the fact (``simclr sync``), and a dead job's run closed
by its launcher."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.logs import get_logger
from trainer.runtime.credentials import store_key, take_credentials, usable_uri
from trainer.runtime.run_files import RunFolderLock, atomic_write_text
from trainer.tracking.config import TrackingConfig
from trainer.tracking.mlflow_run import MlflowRun
from trainer.tracking.run_log import RUN_RECORD, read_metrics_file, read_run_record
from trainer.tracking.store import TrackingError, open_client, store_problem

log = get_logger()


def close_recorded_run(run_dir: str | Path, status: str, tags: dict[str, str]) -> str | None:
    """Close a run folder's MLflow run with ``status`` if its job could not (it died), adding
    ``tags``; the record says so too. Returns what to tell the user, None when the run never
    reached MLflow. A run already closed keeps its status and gains the tags."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    uri, run_id = record.get("uri"), record.get("run_id")
    if not run_id:
        return None
    try:
        client = open_client(usable_uri(uri))
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception as exc:
        return (f"MLflow at {uri} did not answer ({store_problem(exc)}), so run {run_id} stays as it was; "
                f"simclr sync {run_dir} completes it later")
    record.setdefault("tags", {}).update(tags)
    record["status"] = status
    atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1))
    return f"MLflow run {run_id}: {status} (tag simclr.failed_rank={tags.get('simclr.failed_rank', '?')})"


def sync_offline(run_dir: str | Path, cfg: TrackingConfig, run_id: str | None,
                 log_pending_model: Callable[[MlflowRun, dict[str, Any]], bool] | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """Complete a run in MLflow from its folder: by default the run's own MLflow run on its own store
    (both recorded in ``mlflow_run.json``), else ``run_id`` or a new run on ``cfg.uri``. Params,
    tags and name, the metrics the run does not have yet (no duplicate points: a second sync adds
    nothing), artifacts (config, encoder, curves), and the status the run ended with. Returns the
    run id and the record (whose ``model_pending`` says whether the encoder's MLflow model is still
    to be logged; ``log_pending_model(run, pending)`` logs it and says so). The folder gains only the run's id
    and store in its record (``synced_to`` for another store: a second sync there adds nothing)."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.exists():
        raise TrackingError(f"{metrics_file} does not exist; pass the folder of a training run (its train.run_dir, "
                            "which holds metrics.jsonl)")
    record = read_run_record(run_dir)
    try:  # read first: a folder that cannot be replayed must not leave an empty run behind
        rows = read_metrics_file(metrics_file)
    except ValueError as exc:
        raise TrackingError(f"{exc}; {metrics_file} is damaged inside (not only its last line): fix or remove that "
                            "line, then sync again") from None
    cfg = dataclasses.replace(cfg, uri=take_credentials(cfg.uri))
    own_store = not cfg.uri or store_key(cfg.uri) == store_key(record.get("uri", ""))
    # a run replayed into another store is remembered, so a second sync there continues it
    copies = record.get("synced_to") or {}
    run_id = run_id or (record.get("run_id") if own_store else copies.get(store_key(cfg.uri)))
    cfg = dataclasses.replace(cfg, uri=cfg.uri or record.get("uri", ""),
                              experiment=cfg.experiment or record.get("experiment") or "simclr",
                              run_name=cfg.run_name or record.get("run_name", ""), system_metrics=False)
    run = MlflowRun(cfg, source="simclr sync")
    run.start({}, {**record.get("tags", {}), "simclr.synced_from": str(run_dir)}, run_id=run_id)
    if not run.flush(force=True):
        raise TrackingError(f"MLflow at {run.uri}: {run.problem}; nothing was lost ({run_dir} is unchanged): "
                            "run simclr sync again once that is fixed")
    _queue_what_is_missing(run, record, rows)
    if not run.flush(force=True):
        raise TrackingError(f"MLflow at {run.uri} stopped answering during the sync; run simclr sync again "
                            "(points already sent are not sent twice)")
    for name in ("config.yaml", "encoder.pt", "curves.png"):
        if (run_dir / name).exists():
            run.log_artifact(run_dir / name)
    if own_store and record.get("run_id") != run.run_id:  # a run created now: the next sync completes it
        record.update(uri=run.uri, run_id=run.run_id)
        atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1))
    elif not own_store and copies.get(store_key(cfg.uri)) != run.run_id:
        record["synced_to"] = {**copies, store_key(cfg.uri): run.run_id}
        atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1))
    if record.get("model_pending") is not None and log_pending_model is not None \
            and log_pending_model(run, record["model_pending"]):
        record["model_pending"] = None
        atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1))
    _finish_as_the_run_ended(run, run_dir, record.get("status"))
    return run.run_id or "", record


def _queue_what_is_missing(run: MlflowRun, record: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The params and metric points of the folder that the MLflow run does not have yet."""
    logged = run.client.get_run(run.run_id)
    run.pending_params = {k: v for k, v in record.get("params", {}).items() if k not in logged.data.params}
    have = {(key, m.step, m.timestamp) for key in logged.data.metrics
            for m in run.client.get_metric_history(run.run_id, key)}
    for rec in rows:
        step, t = rec.pop("step"), rec.pop("time_ms")
        run.pending.extend((k, float(v), t, step) for k, v in rec.items() if (k, step, t) not in have)


def _finish_as_the_run_ended(run: MlflowRun, run_dir: Path, status: str | None) -> None:
    """Close the MLflow run with the status its run ended with. A run still training, or one killed
    hard (its record says RUNNING: nobody closed it), stays as it is: closing it would hide the
    unclean exit that its next resume records."""
    holder = RunFolderLock(run_dir).held_elsewhere()
    if holder or status in (None, "RUNNING"):
        run.finish(None)
        why = (f"is still training ({holder}); it closes its MLflow run itself" if holder else
               "ended without closing (killed hard?); resuming it continues the same MLflow run and records that")
        log.info(f"the run in {run_dir} {why}. Its MLflow run stays RUNNING")
    else:
        run.finish(status)
