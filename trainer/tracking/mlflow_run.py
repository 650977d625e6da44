"""The MLflow sink: one run, created or continued; everything queued and sent in batches, a
store that does not answer retried every ``retry_s`` without blocking training, MLflow's
system-metrics monitor while the run is open. Also eval's, sync's and the benchmarks' client."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.logs import get_logger
from trainer.runtime.credentials import redact_uri
from trainer.tracking.config import TrackingConfig
from trainer.tracking.provenance import standard_tags
from trainer.tracking.run_log import RUN_RECORD
from trainer.tracking.sink import Sink, register_sink
from trainer.tracking.store import create_experiment, open_client, resolve_tracking_uri, store_problem, where_to_open

tracking_log = get_logger("tracking")


class MlflowRun(Sink):
    """One MLflow run, created or continued. Everything is queued and sent in batches; a store that
    does not answer is warned about once and retried every ``retry_s`` (never blocking training);
    MLflow's system-metrics monitor runs while the run is open. It tells the other sinks where the
    run lives (``uri``, ``run_id``) once it exists. A training run's sink has ``local_copy`` (its
    metrics file, named in the warnings) and ``continues_training`` (a run left RUNNING is an
    unclean exit)."""

    takes_datasets = True

    def __init__(self, cfg: TrackingConfig, retry_s: float = 30.0, continues_training: bool = False,
                 local_copy: Path | None = None, source: str = "simclr", goes_on: str = "",
                 reopens: bool = True) -> None:
        self.cfg, self.retry_s, self.source = cfg, retry_s, source
        self.reopens = reopens  # a continued run is RUNNING again until finished (not so when eval adds to it)
        self.experiment_id = ""
        self.goes_on = goes_on  # what the warning says carries on without the store (default: the training)
        self.continues_training, self.local_copy = continues_training, local_copy
        self.run_id: str | None = None
        self.uri = self.client_uri = ""
        self.client = None
        self.pending: list[tuple[str, float, int, int]] = []  # (key, value, time ms, step) not sent yet
        self.pending_params: dict[str, Any] = {}
        self.pending_tags: dict[str, str] = {}
        self.tags_to_delete: set[str] = set()
        self.pending_inputs: list[Any] = []  # DatasetInputs not sent yet
        self.pending_artifacts: list[tuple[str, str | None]] = []  # (file, folder in the run) not uploaded yet
        self._warned = False
        self._offline = False  # the last request failed: wait retry_s before the next, forced or not
        self._finishing = False  # finish: one more try, whatever the window
        self._last_try = 0.0
        self._run_created = False
        self._started = self._finished = False
        self._monitor = None  # MLflow's system-metrics thread, once the run exists
        self.problem = ""  # what the store's last failure was, in words (store_problem)

    def warn(self, what: str, exc: Exception) -> None:
        """The store failed while doing ``what``: offline until the next retry; one warning per run."""
        self._offline = True
        self.problem = store_problem(exc)
        if not self._warned:
            self._warned = True
            kept = f"metrics are kept in {self.local_copy} and " if self.local_copy else "metrics are "
            goes_on = self.goes_on or f"training continues, {kept}retried every {self.retry_s:.0f}s"
            tracking_log.warning(f"MLflow at {self.uri} failed while {what}: {self.problem}; {goes_on}")

    def _connect(self) -> bool:
        """Create (or reattach to) the run; True when the server answered."""
        if self.run_id is not None and self._run_created:
            return True
        try:
            if self.client is None:
                self.client_uri = resolve_tracking_uri(self.cfg.uri)
                self.uri = redact_uri(self.client_uri)  # what is shown and recorded
                self.client = open_client(self.client_uri)
            if self.run_id is None:
                exp = self.client.get_experiment_by_name(self.cfg.experiment)
                if exp is None:
                    try:
                        exp_id = create_experiment(self.client, self.client_uri, self.cfg.experiment)
                    except Exception as exc:  # another rank or array task created it first, or the store failed
                        created = self.client.get_experiment_by_name(self.cfg.experiment)
                        if created is None:
                            raise exc
                        exp_id = created.experiment_id
                else:
                    exp_id = exp.experiment_id
                run = self.client.create_run(exp_id, run_name=self.cfg.run_name or None,
                                             tags=standard_tags(self.source))
                self.run_id, self.experiment_id = run.info.run_id, str(exp_id)
                resumed = False
            else:
                if self.continues_training:  # not simclr sync completing a run
                    self._mark_unclean_exit()
                if self.reopens:
                    self.client.update_run(self.run_id, status="RUNNING")
                self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
                resumed = True
            self._run_created = True
            self.tell(uri=self.uri, run_id=self.run_id)
            self._start_system_metrics(resumed)
            return True
        except Exception as exc:  # network errors come in many types; all mean 'try later'
            self.warn("starting the run", exc)
            return False

    def _mark_unclean_exit(self) -> None:
        """A run we continue should have been closed (FINISHED, KILLED, FAILED) by the job before;
        still RUNNING means that job was killed hard (SIGKILL, node loss): count it in a tag."""
        run = self.client.get_run(self.run_id)
        if run.info.status == "RUNNING":
            count = int(run.data.tags.get("simclr.unclean_exits", "0")) + 1
            self.client.set_tag(self.run_id, "simclr.unclean_exits", str(count))
            tracking_log.warning(f"MLflow run {self.run_id} was left RUNNING by a job that did not exit cleanly; "
                                 f"continuing it (tag simclr.unclean_exits={count})")

    def _start_system_metrics(self, resumed: bool) -> None:
        """MLflow's own monitor (psutil; NVML for GPUs where present), logging system/* metrics on
        a thread of this process; a resumed run continues its steps."""
        if not self.cfg.system_metrics or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                                 resume_logging=resumed, tracking_uri=self.client_uri)
            self._monitor.start()
        except Exception as exc:  # e.g. psutil missing: training goes on without system metrics
            tracking_log.warning(f"system metrics are off ({type(exc).__name__}: {exc})")
            self._monitor = None

    def start(self, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None) -> str | None:
        """Start a new run (log params and tags) or continue ``run_id`` (a resumed job)."""
        self._started = True
        self.tell(uri=redact_uri(resolve_tracking_uri(self.cfg.uri)))  # where to sync to, even if never reached
        self.run_id = run_id or self.run_id  # or the one load_state_dict gave
        if self.run_id is None:
            self.pending_params = dict(params)
        self.pending_tags = dict(tags)
        self.flush(force=True)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
        self.pending.extend((k, float(v), time_ms, step) for k, v in metrics.items())
        self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        self.pending_params.update(params)
        self.flush(force=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.pending_tags.update(tags)
        self.flush(force=True)

    def delete_tags(self, keys: list[str]) -> None:
        self.tags_to_delete |= set(keys)
        self.flush(force=True)

    def log_datasets(self, inputs: list[Any]) -> None:
        """Dataset inputs (``dataset_input``) for MLflow's Datasets column."""
        if inputs:
            self.pending_inputs.extend(inputs)
            self.flush(force=True)

    def log_model(self, log: Callable[[MlflowRun], str | None]) -> str | None:
        """Log the encoder as an MLflow model with ``log(self)`` (trainer/evaluation/export.py)."""
        return log(self)

    def detach_run_folder(self) -> None:
        self.local_copy = None

    def flush(self, force: bool = False) -> bool:
        """Send what is queued; True when nothing is left. Once the server failed, it is offline
        for ``retry_s``: every call until then returns at once (a server that accepts but never
        answers would otherwise cost a request timeout per call); ``force`` tries again anyway
        only after a success, or at the end of the run (``finish``)."""
        if self._offline and (not force or not self._finishing) and time.time() - self._last_try < self.retry_s:
            return False
        self._last_try = time.time()
        if not self._connect():
            return False
        from mlflow.entities import Metric, Param, RunTag

        try:
            self._send_params([Param(k, str(v)[:6000]) for k, v in self.pending_params.items()])
            self.pending_params = {}
            if self.pending_tags:
                self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in self.pending_tags.items()])
                self.pending_tags = {}
            if self.pending_inputs:
                self.client.log_inputs(self.run_id, datasets=self.pending_inputs)
                self.pending_inputs = []
            present = self.client.get_run(self.run_id).data.tags if self.tags_to_delete else {}
            for key in sorted(self.tags_to_delete & present.keys()):
                self.client.delete_tag(self.run_id, key)
            self.tags_to_delete = set()
            while self.pending:
                chunk = self.pending[:1000]
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in chunk])
                del self.pending[: len(chunk)]
            while self.pending_artifacts:
                path, artifact_path = self.pending_artifacts[0]
                if Path(path).exists():  # a run folder cleaned up meanwhile: nothing left to send
                    self.client.log_artifact(self.run_id, path, artifact_path)
                del self.pending_artifacts[0]
        except Exception as exc:
            self.warn("logging", exc)
            return False
        self._offline = False
        return True

    def _send_params(self, params: list) -> None:
        """Params in batches. MLflow refuses a batch holding a param the run already has with another
        value (a job resumed twice from one step records its changes twice): then the batch goes one
        by one and such a param is left out with a note, never blocking everything queued after it."""
        for i in range(0, len(params), 100):
            batch = params[i : i + 100]
            try:
                self.client.log_batch(self.run_id, params=batch)
            except Exception as exc:
                if "changing param values is not allowed" not in str(exc).lower():
                    raise
                kept = self.client.get_run(self.run_id).data.params
                for param in batch:
                    if param.key in kept:
                        if kept[param.key] != param.value:
                            tracking_log.warning(f"MLflow param {param.key} stays {kept[param.key]!r} (a "
                                                 f"param cannot change; this job's value {param.value!r} is in the "
                                                 "run folder's record)")
                        continue
                    self.client.log_batch(self.run_id, params=[param])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queued like a metric: a store that failed a moment ago gets it at the next flush or at
        ``finish`` (one timed-out request must not cost a sweep's run its encoder)."""
        self.pending_artifacts.append((str(path), artifact_path))
        self.flush(force=True)

    def finish(self, status: str | None = "FINISHED") -> None:
        """Close the run with ``status`` (once; later calls and a run never started do nothing);
        None sends what is queued and leaves the run's status as it is."""
        if not self._started or self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        self._finishing = True
        # two more chances for a sqlite store (locked by a sweep's other runs) and for a server that
        # refused at once (restarting); one that timed out would only cost another timeout each
        for wait_s in (0.0, 1.0, 3.0):
            time.sleep(wait_s)
            started = time.monotonic()
            sent = self.flush(force=True)
            if sent or (time.monotonic() - started > 1.0 and not self.uri.startswith("sqlite:")):
                break
        if sent and self.run_id and status is not None:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as exc:
                self.warn("closing the run", exc)
        if self.pending_artifacts:
            names = ", ".join(Path(p).name for p, _ in self.pending_artifacts)
            later = f"; simclr sync {self.local_copy.parent} uploads them" if self.local_copy else ""
            tracking_log.warning(f"not uploaded (kept locally): {names}{later}")
        if not sent and self.pending and self.local_copy:
            tracking_log.warning(f"{len(self.pending)} metric values could not be sent; all metrics are in "
                                 f"{self.local_copy}. Replay them later, into this run on its own store (both "
                                 f"recorded in {RUN_RECORD}), with: simclr sync {self.local_copy.parent}")

    def discard(self) -> None:
        """Delete the run this job created (nothing was logged to it but its params and tags)."""
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        if self.run_id is not None and self._run_created:
            try:
                self.client.delete_run(self.run_id)
            except Exception as exc:
                self.warn("deleting the run stopped at start-up", exc)
        self.run_id = None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the run to continue."""
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")

    def describe(self) -> str:
        if self.run_id is None:
            later = f": simclr sync {self.local_copy.parent}" if self.local_copy else ""
            return f"MLflow at {self.uri or redact_uri(resolve_tracking_uri(self.cfg.uri))} not reached yet{later}"
        return f"MLflow run {self.run_id} at {self.uri} ({where_to_open(self.uri, self.run_id, self.experiment_id)})"


@register_sink("mlflow")
def mlflow_sink(cfg: TrackingConfig, run_dir: Path, retry_s: float) -> MlflowRun | None:
    if not cfg.enabled:
        return None
    kept = Path(run_dir) / "metrics.jsonl" if "run_log" in cfg.sinks else None  # what sync can replay
    return MlflowRun(cfg, retry_s, continues_training=True, local_copy=kept, source="simclr train")
