"""A training run's tracking: one ``Tracker`` feeding a list of sinks, the run log (always), the
MLflow run (``tracking.enabled``) and any registered with ``register_sink``.

A new destination (TensorBoard, W&B, a CSV file) is one module with a class implementing ``Sink``
and a factory registered with ``@register_sink("name")``, imported once (``tests/helpers/csv_sink.py``
is one, used by the tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from foundation.logs import get_logger
from foundation.registry import registrar
from trainer.config import TrackingConfig
from trainer.credentials import redact_uri
from trainer.tracking.mlflow_run import MlflowRun
from trainer.tracking.run_log import FAILURE_TAGS, RUN_RECORD, RunLog, read_metrics_file, read_run_record
from trainer.tracking.store import TrackingError, resolve_tracking_uri

log = get_logger()


class Sink(Protocol):
    """A destination of a training run's tracking, on rank 0. ``state_dict`` is what the checkpoint
    keeps for it (opaque to everything but the sink), handed back by ``load_state_dict`` before
    ``start`` on a resume."""

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> Any: ...
    def log_metrics(self, metrics: dict[str, float], step: int, time_ms: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SinkFactory = Callable[[TrackingConfig, Path], "Sink | None"]
SINKS: dict[str, SinkFactory] = {}


# @register_sink("name"): factory(tracking config, run folder) -> Sink | None (None: off for this run)
register_sink = registrar(SINKS)


class Tracker:
    """A training run's tracking, as torchtitan's logger container: one ``log_metrics`` feeds its
    sinks, the run log (rank 0 always) and the MLflow run (rank 0, when ``tracking.enabled``). On
    other ranks (``active=False``) every call is a no-op."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, active: bool, retry_s: float = 30.0) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.local_file = self.run_dir / "metrics.jsonl"
        self.local = RunLog(run_dir) if active else None
        self.mlflow: MlflowRun | None = None
        if active and cfg.enabled:
            self.mlflow = MlflowRun(cfg, retry_s, on_connect=self._record_run, continues_training=True,
                                    local_copy=self.local_file, source="simclr train")
        self.sinks: dict[str, Sink] = {}  # by name: each sink's part of the checkpoint's state
        if active:
            extra = {name: factory(cfg, self.run_dir) for name, factory in SINKS.items()}
            built = {"run_log": self.local, "mlflow": self.mlflow, **extra}
            self.sinks = {name: sink for name, sink in built.items() if sink is not None}
        self._loaded: dict[str, Any] = {}  # the checkpoint's state, kept for sinks this job does not run
        self._started = self._finished = False
        self.logged_through = 0  # a resumed run's last step already in metrics.jsonl (and MLflow): not logged again

    def _record_run(self, uri: str, run_id: str) -> None:
        self.local.update(uri=uri, run_id=run_id)

    @staticmethod
    def run_id_in(state: dict[str, Any]) -> str | None:
        """The MLflow run a checkpoint's tracking state continues (None: none)."""
        return (state or {}).get("mlflow", {}).get("run_id")

    @property
    def run_id(self) -> str | None:
        if self.mlflow is not None and self.mlflow.run_id:
            return self.mlflow.run_id
        return self.run_id_in(self._loaded)

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps of the tracking: each sink's own state, by name (a sink this job
        does not run keeps what the checkpoint had, so the next job can continue it)."""
        return {**self._loaded, **{name: sink.state_dict() for name, sink in self.sinks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed job: every sink continues from its part of the checkpoint's state (on every rank,
        so that each can say which run it continues)."""
        self._loaded = dict(state or {})
        for name, sink in self.sinks.items():
            sink.load_state_dict(self._loaded.get(name, {}))

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Start a new run (log params and tags), or continue the one the loaded state names."""
        self._started = True
        run_id = self.run_id
        if self.local is not None:
            if run_id is None:
                self.local.begin(self.cfg.experiment, self.cfg.run_name, params)
            else:
                try:
                    read_run_record(self.run_dir)
                except TrackingError as exc:  # a derived file: written again from this job and the checkpoint
                    log.warning(f"{str(exc).split(';')[0]}; written again from this job's params and the "
                                f"checkpoint's MLflow run {run_id}")
                    self.local.begin(self.cfg.experiment, self.cfg.run_name, params)
                    self.local.update(run_id=run_id)
                # a job resumed from a checkpoint older than its last logged step recomputes those steps
                # (bitwise, or with the changes it records): the values already logged stand
                rows = read_metrics_file(self.local_file, lenient=True) if self.local_file.exists() else []
                self.logged_through = max((int(r.get("step", 0)) for r in rows), default=0)
                tags = {**tags, **self.local.resolve_failure()}
            self.local.update(tags=tags, status="RUNNING")  # until finish: a hard kill leaves RUNNING
        for sink in self._extra_sinks():
            sink.start(params, tags)
        if self.mlflow is None:
            return None
        self.local.update(uri=redact_uri(resolve_tracking_uri(self.cfg.uri)))
        if "simclr.earlier_failures" in tags:
            self.mlflow.tags_to_delete |= set(FAILURE_TAGS)
        return self.mlflow.start(params, tags, run_id)

    def _extra_sinks(self) -> list[Sink]:
        """The sinks other than the run log and MLflow (whose start the tracker orders itself)."""
        return [sink for sink in self.sinks.values() if sink is not self.local and sink is not self.mlflow]

    def discard(self) -> None:
        """A new run stopped before its first step: its MLflow run (deleted) and its record go, as if
        it had never started; a resumed run is only closed."""
        self._finished = True
        if self.mlflow is not None:
            self.mlflow.discard()
        if self.local is not None:
            for name in (RUN_RECORD, "config.yaml"):
                (self.run_dir / name).unlink(missing_ok=True)

    @property
    def takes_datasets(self) -> bool:
        """Whether a sink records dataset inputs (building them needs MLflow)."""
        return self.mlflow is not None

    def log_datasets(self, inputs: list[Any]) -> None:
        """Dataset inputs (``dataset_input``) for MLflow's Datasets column."""
        if self.mlflow is not None and inputs:
            self.mlflow.pending_inputs.extend(inputs)
            self.mlflow.flush(force=True)

    def detach_run_folder(self) -> None:
        """The run folder was moved or removed: nothing more is written where it was."""
        self.sinks.pop("run_log", None)
        self.local = None
        if self.mlflow is not None:
            self.mlflow.local_copy = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        for sink in self.sinks.values():
            sink.log_metrics(metrics, step, now)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params added later in a run (MLflow params cannot change, so new keys, e.g. a change of
        world size on resume as ``world_size.from_step_<N>``)."""
        for sink in self.sinks.values():
            sink.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        for sink in self.sinks.values():
            sink.set_tags(tags)

    def delete_tags(self, keys: list[str]) -> None:
        """Tags that no longer hold (an early stop, once the run finished), from the record and MLflow."""
        if self.local is not None:
            self.local.update(drop_tags=keys)
        if self.mlflow is not None:
            self.mlflow.tags_to_delete |= set(keys)
            self.mlflow.flush(force=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for sink in self.sinks.values():
            sink.log_artifact(path, artifact_path)

    def log_model(self, log: Callable[[MlflowRun], str | None]) -> str | None:
        """Log the encoder as an MLflow model with ``log(run)`` (trainer/export.py); None when MLflow is
        off or unreachable (``simclr sync`` logs it later)."""
        return log(self.mlflow) if self.mlflow is not None else None

    def model_pending(self, register_as: str | None) -> None:
        """Record that the encoder's MLflow model is still to be logged (``simclr sync`` logs it),
        or, with None, that it was."""
        if self.local is not None:
            self.local.update(model_pending=None if register_as is None else {"register_as": register_as})

    def finish(self, status: str = "FINISHED") -> None:
        """Close the MLflow run with ``status``, recorded in the run log too (once)."""
        if not self.sinks or not self._started or self._finished:
            return
        self._finished = True
        for sink in self.sinks.values():
            sink.finish(status)

    def describe(self) -> str:
        if self.mlflow is None:
            return f"metrics in {self.local_file} (MLflow tracking is off)"
        if self.mlflow.run_id is None:
            return (f"metrics in {self.local_file} (MLflow at {self.mlflow.uri} not reached yet: simclr sync "
                    f"{self.run_dir})")
        return self.mlflow.describe()
