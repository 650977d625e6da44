"""Tracking: every metric, param, tag and artifact of a run, sent to a list of sinks.

- ``sink.py``        ``Sink`` (every method a do-nothing default) and ``register_sink``: a new destination
                     is one file, chosen by name in ``tracking.sinks``
- ``tracker.py``     ``Tracker``: the run's events, in order, to each chosen sink; it names none
- ``run_log.py``     the ``run_log`` sink: the run folder's record (metrics.jsonl, mlflow_run.json), first
- ``mlflow_run.py``  the ``mlflow`` sink: queue, retries, system metrics (also eval's, sync's, bench's client)
- ``store.py``       MLflow stores: URIs, clients, experiments, failures named, where to open a run
- ``provenance.py``  commit, library versions, dataset inputs, params, standard tags
- ``sync.py``        ``simclr sync`` and a dead job's run closed by its launcher

Nothing outside this package imports mlflow but the encoder's export (an MLflow model), which is
handed its run by the tracker.
"""

from trainer.tracking.mlflow_run import MlflowRun
from trainer.tracking.provenance import dataset_input, git_commit, library_versions, run_params, standard_tags
from trainer.tracking.run_log import RUN_RECORD, RunLog, read_metrics_file, read_run_record, run_id_of
from trainer.tracking.store import (
    TrackingError,
    check_store_uri,
    open_client,
    prepare_store,
    quiet_library_logs,
    resolve_tracking_uri,
    store_problem,
    where_to_open,
)
from trainer.tracking.sync import close_recorded_run, sync_offline
from trainer.tracking.tracker import Tracker

__all__ = ["RUN_RECORD", "MlflowRun", "RunLog", "Tracker", "TrackingError", "check_store_uri", "close_recorded_run",
           "dataset_input", "git_commit", "library_versions", "open_client", "prepare_store", "quiet_library_logs",
           "read_metrics_file", "read_run_record", "resolve_tracking_uri", "run_id_of", "run_params", "standard_tags",
           "store_problem", "sync_offline", "where_to_open"]
