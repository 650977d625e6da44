"""MLflow tracking on rank 0, with an offline fallback that never loses a metric.

Every metric is appended to ``<run_dir>/metrics.jsonl`` first, then sent to MLflow in batches.
If the server is unreachable (at start or mid-run) training goes on: one warning is printed, the
unsent metrics stay queued and are retried every ``retry_s``; a run created late receives the
whole backlog. ``simclr sync RUN_DIR`` replays the local file into MLflow afterwards.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer import package_version
from trainer.config import Config, TrackingConfig, config_to_dict
from trainer.credentials import redact_uri, store_key, take_credentials, usable_uri
from trainer.dataclass_yaml import ConfigError, flatten
from trainer.run_files import RunFolderLock, append_line, atomic_write_text, read_jsonl

FAILURE_TAGS = ("simclr.failed_rank", "simclr.failure")  # a failed job's; removed when the run is resumed
RUN_RECORD = "mlflow_run.json"  # beside metrics.jsonl: the params, tags and name, for `simclr sync`


class TrackingError(RuntimeError):
    """A tracking problem the user must act on (a run folder without metrics, a store that does not
    answer when replaying); the CLI prints it as one line with status 2."""


def tracking_scheme(uri: str) -> str:
    """The scheme of an MLflow tracking URI ('' for the default store or a plain local path)."""
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri or uri.startswith("file:") else ""


def known_tracking_schemes() -> set[str]:
    """MLflow's built-in tracking stores and those plugins register (entry points)."""
    from importlib.metadata import entry_points

    plugins = {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    return {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
            "uc", *plugins}




def check_store_uri(uri: str) -> None:
    """A tracking URI MLflow can open: a known scheme, and no file store unless MLflow is told to
    allow one (MLflow 3 refuses them: every run would go untracked)."""
    scheme = tracking_scheme(uri)
    if scheme not in known_tracking_schemes():
        raise ConfigError(f"tracking.uri: {uri!r} is out of range; MLflow does not know the scheme {scheme!r}; use "
                          "http(s)://host:port, sqlite:///path.db, a database URI (postgresql://, mysql://, mssql://), "
                          "databricks, or '' for the default store")
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
    if uri and scheme in ("", "file") and not allowed:
        raise ConfigError(f"tracking.uri: {uri!r} is out of range; a file store, which MLflow 3 refuses (every run "
                          "would go untracked); use tracking.uri=sqlite:///DIR/mlflow.db, or set "
                          "MLFLOW_ALLOW_FILE_STORE=true to keep a file store")


def resolve_tracking_uri(uri: str) -> str:
    """The store a run logs to: ``tracking.uri``, else MLflow's own default (MLFLOW_TRACKING_URI,
    or ``mlflow.db`` in the working directory)."""
    import mlflow

    return usable_uri(uri or mlflow.get_tracking_uri())


def quiet_library_logs() -> None:
    """MLflow's INFO lines (its system-metrics monitor starting and stopping, store migrations) stay
    off the console, which shows our own lines; ``simclr --verbose`` (SIMCLR_VERBOSE=1) shows them.
    Its warnings and errors still show."""
    import logging

    if os.environ.get("SIMCLR_VERBOSE", "") not in ("", "0"):
        return
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it logs every SQL error with its traceback before raising it (8 tracebacks for one full disk); we
    # catch what it raises and name the problem in one line (store_problem)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def open_client(uri: str) -> Any:
    """An MlflowClient for ``uri``. Opening a new sqlite store creates its schema, which breaks when
    several processes (the runs of a local sweep) do it at once, so they take turns on a lock file
    beside the database."""
    from mlflow.tracking import MlflowClient

    quiet_library_logs()
    _fail_fast_over_http()
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_experiment(client: Any, uri: str, name: str) -> str:
    """Create experiment ``name``. On a sqlite store its artifacts go beside the database
    (``mlartifacts/<name>``), not into the working directory of whichever job created it."""
    location = None
    if uri.startswith("sqlite:///"):
        location = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / name)
    # MLflow 3's UI opens an experiment without a kind in its GenAI workspace; ours are model training
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND: "custom_model_development"})


EXPERIMENT_KIND = "mlflow.experimentKind"


def standard_tags(source: str) -> dict[str, str]:
    """MLflow's own system tags for a run we start, so that its UI shows who ran what from which
    commit ("Created by", "Source"): the user, the command, the kind of source, the commit (where
    known; the packaged version is always in ``simclr.version``)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = str(os.getuid())
    tags = {"mlflow.user": user, "mlflow.source.name": source,
            "mlflow.source.type": "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL",
            "simclr.version": package_version()}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def _fail_fast_over_http() -> None:
    """MLflow retries an unreachable server for minutes by default; our queue does the retrying,
    so each request fails fast. Set when the first client is made, never at import, and only
    where the user has not chosen values."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def store_problem(exc: BaseException) -> str:
    """What an MLflow store error means, in words, with what to do: a store another MLflow version
    made, a file store (MLflow 3 refuses them), a full disk, or a store that did not answer."""
    import re

    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "database or disk is full" in low or "no space left" in low:
        return "the store's disk is full; free space there"
    found = re.search(r"found version (\w+), but expected (\w+)", text)
    if found:
        import mlflow

        migrations = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
        if any(migrations.glob(f"{found.group(1)}_*.py")):
            return (f"the store was made by an older MLflow (schema {found.group(1)}; this MLflow {mlflow.__version__} "
                    f"expects {found.group(2)}); back it up, then upgrade it with: mlflow db upgrade URI, or use "
                    "another tracking.uri")
        return (f"the store was made by a newer MLflow than this one ({mlflow.__version__}; its schema "
                f"{found.group(1)} is unknown here); use that MLflow version or another tracking.uri (do not run "
                "mlflow db upgrade: it cannot downgrade)")
    if "filesystem tracking backend" in low or "file store" in low:
        return ("MLflow 3 refuses file stores (file:///dir, ./mlruns); use tracking.uri=sqlite:///DIR/mlflow.db, or "
                "set MLFLOW_ALLOW_FILE_STORE=true")
    return f"unreachable: {text.splitlines()[0][:200] if text else type(exc).__name__}"


def read_metrics_file(path: str | Path, lenient: bool = False) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``step``, ``time_ms`` and the metrics); [] if absent;
    a torn last line is left out, and with ``lenient`` any damaged line (``trainer.run_files.read_jsonl``)."""
    return read_jsonl(path, lenient)


def git_commit() -> str:
    """HEAD of this checkout; where the tree is a copy without ``.git`` (a container image, an
    exported tree), the commit it came from, passed as SIMCLR_GIT_COMMIT."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        found = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found or os.environ.get("SIMCLR_GIT_COMMIT", "") or "unknown"


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name, dist_name in (("torch", "torch"), ("torchvision", "torchvision"), ("mlflow", "mlflow"),
                            ("dali", "nvidia-dali-cuda130"), ("dali", "nvidia-dali-cuda120")):
        if name in versions:
            continue
        try:
            versions[name] = metadata.version(dist_name)
            if name == "dali":
                versions["dali_build"] = dist_name
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dataset_input(location: str, fingerprint: dict[str, Any], context: str) -> Any:
    """An MLflow dataset input for a dataset we fingerprinted (``data_fingerprint``): its digest is
    the fingerprint's (cut to MLflow's 32-character column), its source the data root or shard
    folder, its profile the count and classes; ``context`` is ``training`` or ``validation``. What
    fills the run page's Datasets column and the search and comparison by dataset."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = Path(location).name or location
    if name in ("train", "val", "test", "validation"):  # a split: name it after its dataset too
        name = f"{Path(location).parent.name}/{name}"
    profile = {"num_samples": fingerprint["samples"], "num_classes": len(fingerprint.get("classes", [])),
               "classes": fingerprint.get("classes", [])[:50]}
    dataset = Dataset(name=name, digest=fingerprint["listing_sha1"][:32], source_type="local",
                      source=json.dumps({"uri": str(location)}), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def run_params(cfg: Config, world_size: int, backend: str, steps_per_epoch: int) -> dict[str, Any]:
    """A training run's MLflow params: the flattened config, the job's shape, the code and libraries."""
    return {**flatten(config_to_dict(cfg)), "world_size": world_size, "data.backend_resolved": backend,
            "steps_per_epoch": steps_per_epoch, "git_commit": git_commit(),
            **{f"version.{k}": v for k, v in library_versions().items()}}


class RunLog:
    """The run folder's own record, written first and never lost: every metric appended to
    ``metrics.jsonl``, and the run's params, tags, name, store, MLflow run id, end status and a
    model still to log in ``mlflow_run.json`` (what ``simclr sync`` replays)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self._record: dict[str, Any] | None = None

    def log(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
        # never mkdir here: a folder moved away under the run must not come back half (RunFolderLock.check)
        append_line(self.metrics_file, json.dumps({"step": step, "time_ms": time_ms, **metrics}))

    def begin(self, experiment: str, run_name: str, params: dict[str, Any]) -> None:
        """A new run's record (a resumed run adds to the one its first job wrote)."""
        self._record = {"experiment": experiment, "run_name": run_name,
                        "params": {k: str(v) for k, v in params.items()}, "tags": {}}

    def update(self, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, **fields: Any) -> None:
        """Add ``params`` and ``tags``; ``fields``: its store (``uri``), ``run_id``, the ``status``
        it ended with and a model still to log (``model_pending``)."""
        record = self._record
        if record is None:  # a resumed run: add to what the first attempt recorded
            record = read_run_record(self.run_dir) or {"params": {}, "tags": {}}
        record["params"].update({k: str(v) for k, v in (params or {}).items()})
        record["tags"].update({k: str(v) for k, v in (tags or {}).items()})
        for key in fields.pop("drop_tags", []):
            record["tags"].pop(key, None)
        record.update(fields)
        self._record = record
        atomic_write_text(self.run_dir / RUN_RECORD, json.dumps(record, indent=1))


    def resolve_failure(self) -> dict[str, str]:
        """A job that failed (a rank died) is resumed: its failure tags (``FAILURE_TAGS``) move to
        ``simclr.earlier_failures``, so that a run that then finishes does not read as failed."""
        record = read_run_record(self.run_dir) or {"params": {}, "tags": {}}
        tags = record.get("tags", {})
        if "simclr.failed_rank" not in tags:
            return {}
        said = f"rank {tags.pop('simclr.failed_rank')}: {tags.pop('simclr.failure', '?')}"
        earlier = "; ".join(filter(None, [tags.get("simclr.earlier_failures", ""), said]))
        self._record = record
        return {"simclr.earlier_failures": earlier[-5000:]}


class MlflowRun:
    """One MLflow run, created or continued. Everything is queued and sent in batches; a store that
    does not answer is warned about once and retried every ``retry_s`` (never blocking training);
    MLflow's system-metrics monitor runs while the run is open. ``on_connect(uri, run_id)`` is told
    where the run lives once it exists. A training run's sink has ``local_copy`` (its metrics file,
    named in the warnings) and ``continues_training`` (a run left RUNNING is an unclean exit)."""

    def __init__(self, cfg: TrackingConfig, retry_s: float = 30.0,
                 on_connect: Callable[[str, str], None] | None = None, continues_training: bool = False,
                 local_copy: Path | None = None, source: str = "simclr", goes_on: str = "",
                 reopens: bool = True) -> None:
        self.cfg, self.retry_s, self.source = cfg, retry_s, source
        self.reopens = reopens  # a continued run is RUNNING again until finished (not so when eval adds to it)
        self.experiment_id = ""
        self.goes_on = goes_on  # what the warning says carries on without the store (default: the training)
        self.on_connect, self.continues_training, self.local_copy = on_connect, continues_training, local_copy
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
            print(f"[tracking] WARNING: MLflow at {self.uri} failed while {what}: {self.problem}; {goes_on}",
                  file=sys.stderr, flush=True)

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
            if self.on_connect is not None:
                self.on_connect(self.uri, self.run_id)
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
            print(f"[tracking] MLflow run {self.run_id} was left RUNNING by a job that did not exit cleanly; "
                  f"continuing it (tag simclr.unclean_exits={count})", file=sys.stderr, flush=True)

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
            print(f"[tracking] system metrics are off ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            self._monitor = None

    def start(self, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None) -> str | None:
        """Start a new run (log params and tags) or continue ``run_id`` (a resumed job)."""
        self._started = True
        self.run_id = run_id
        if run_id is None:
            self.pending_params = dict(params)
        self.pending_tags = dict(tags)
        self.flush(force=True)
        return self.run_id

    def log(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
        self.pending.extend((k, float(v), time_ms, step) for k, v in metrics.items())
        self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        self.pending_params.update(params)
        self.flush(force=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.pending_tags.update(tags)
        self.flush(force=True)

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
                            print(f"[tracking] note: MLflow param {param.key} stays {kept[param.key]!r} (a param "
                                  f"cannot change; this job's value {param.value!r} is in the run folder's record)",
                                  file=sys.stderr, flush=True)
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
        sent = self.flush(force=True)
        # a busy sqlite store (a sweep's runs sharing one file) gets more chances; a server that failed
        # just now would only cost another request timeout each
        for wait_s in (1.0, 3.0) if self.uri.startswith("sqlite:") else ():
            if sent:
                break
            time.sleep(wait_s)
            sent = self.flush(force=True)
        if sent and self.run_id and status is not None:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as exc:
                self.warn("closing the run", exc)
        if self.pending_artifacts:
            names = ", ".join(Path(p).name for p, _ in self.pending_artifacts)
            later = f"; simclr sync {self.local_copy.parent} uploads them" if self.local_copy else ""
            print(f"[tracking] not uploaded (kept locally): {names}{later}", file=sys.stderr, flush=True)
        if not sent and self.pending and self.local_copy:
            print(f"[tracking] {len(self.pending)} metric values could not be sent; all metrics are in "
                  f"{self.local_copy}. Replay them later, into this run on its own store (both recorded in "
                  f"{RUN_RECORD}), with: simclr sync {self.local_copy.parent}", file=sys.stderr)

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

    def describe(self) -> str:
        return f"MLflow run {self.run_id} at {self.uri} ({where_to_open(self.uri, self.run_id, self.experiment_id)})"


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
        self._run_id: str | None = None  # a finished run's, when MLflow is not started
        self._started = self._finished = False
        self.logged_through = 0  # a resumed run's last step already in metrics.jsonl (and MLflow): not logged again

    def _record_run(self, uri: str, run_id: str) -> None:
        self.local.update(uri=uri, run_id=run_id)

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow is not None and self.mlflow.run_id else self._run_id

    @run_id.setter
    def run_id(self, value: str | None) -> None:
        self._run_id = value

    def start(self, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None) -> str | None:
        """Start a new run (log params and tags) or continue ``run_id`` (a resumed job)."""
        self._started = True
        if self.local is not None:
            if run_id is None:
                self.local.begin(self.cfg.experiment, self.cfg.run_name, params)
            else:
                try:
                    read_run_record(self.run_dir)
                except TrackingError as exc:  # a derived file: written again from this job and the checkpoint
                    print(f"[simclr] note: {str(exc).split(';')[0]}; written again from this job's params and the "
                          f"checkpoint's MLflow run {run_id}", file=sys.stderr, flush=True)
                    self.local.begin(self.cfg.experiment, self.cfg.run_name, params)
                    self.local.update(run_id=run_id)
                # a job resumed from a checkpoint older than its last logged step recomputes those steps
                # (bitwise, or with the changes it records): the values already logged stand
                rows = read_metrics_file(self.local_file, lenient=True) if self.local_file.exists() else []
                self.logged_through = max((int(r.get("step", 0)) for r in rows), default=0)
                tags = {**tags, **self.local.resolve_failure()}
            self.local.update(tags=tags, status="RUNNING")  # until finish: a hard kill leaves RUNNING
        if self.mlflow is None:
            return None
        self.local.update(uri=redact_uri(resolve_tracking_uri(self.cfg.uri)))
        if "simclr.earlier_failures" in tags:
            self.mlflow.tags_to_delete |= set(FAILURE_TAGS)
        return self.mlflow.start(params, tags, run_id)

    def discard(self) -> None:
        """A new run stopped before its first step: its MLflow run (deleted) and its record go, as if
        it had never started; a resumed run is only closed."""
        self._finished = True
        if self.mlflow is not None:
            self.mlflow.discard()
        if self.local is not None:
            for name in (RUN_RECORD, "config.yaml"):
                (self.run_dir / name).unlink(missing_ok=True)

    def log_datasets(self, inputs: list[Any]) -> None:
        """Dataset inputs (``dataset_input``) for MLflow's Datasets column."""
        if self.mlflow is not None and inputs:
            self.mlflow.pending_inputs.extend(inputs)
            self.mlflow.flush(force=True)

    def detach_run_folder(self) -> None:
        """The run folder was moved or removed: nothing more is written where it was."""
        self.local = None
        if self.mlflow is not None:
            self.mlflow.local_copy = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        for sink in (self.local, self.mlflow):
            if sink is not None:
                sink.log(metrics, step, now)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params added later in a run (MLflow params cannot change, so new keys, e.g. a change of
        world size on resume as ``world_size.from_step_<N>``)."""
        if self.local is not None:
            self.local.update(params=params)
        if self.mlflow is not None:
            self.mlflow.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.local is not None:
            self.local.update(tags=tags)
        if self.mlflow is not None:
            self.mlflow.set_tags(tags)

    def delete_tags(self, keys: list[str]) -> None:
        """Tags that no longer hold (an early stop, once the run finished), from the record and MLflow."""
        if self.local is not None:
            self.local.update(drop_tags=keys)
        if self.mlflow is not None:
            self.mlflow.tags_to_delete |= set(keys)
            self.mlflow.flush(force=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifact(path, artifact_path)

    def model_pending(self, register_as: str | None) -> None:
        """Record that the encoder's MLflow model is still to be logged (``simclr sync`` logs it),
        or, with None, that it was."""
        if self.local is not None:
            self.local.update(model_pending=None if register_as is None else {"register_as": register_as})

    def finish(self, status: str = "FINISHED") -> None:
        """Close the MLflow run with ``status``, recorded in the run log too (once)."""
        if (self.local is None and self.mlflow is None) or not self._started or self._finished:
            return
        self._finished = True
        if self.local is not None:  # None once the run folder is gone
            self.local.update(status=status)
        if self.mlflow is not None:
            self.mlflow.finish(status)

    def describe(self) -> str:
        if self.mlflow is None:
            return f"metrics in {self.local_file} (MLflow tracking is off)"
        if self.mlflow.run_id is None:
            return (f"metrics in {self.local_file} (MLflow at {self.mlflow.uri} not reached yet: simclr sync "
                    f"{self.run_dir})")
        return self.mlflow.describe()


# MLflow 3's UI opens in its GenAI view unless the address asks for the model-training one
TRAINING_VIEW = "?workflowType=machine_learning"


def where_to_open(uri: str, run_id: str | None = None, experiment_id: str = "") -> str:
    """How a person opens ``uri`` in a browser, in MLflow's model-training view: a tracking server is
    a web UI already (the run's own page when known); a local store needs ``mlflow ui`` started on it."""
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        if run_id and experiment_id:
            return f"open {base}/#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW}"
        return f"open {base}/#/experiments{TRAINING_VIEW}"
    page = f"experiments/{experiment_id}/runs/{run_id}" if run_id and experiment_id else "experiments"
    return f"open the UI with: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/#/{page}{TRAINING_VIEW}"


def prepare_store(cfg: TrackingConfig) -> None:
    """Create the store's schema and the experiment once, from the submitting process, so that the
    tasks of a job array do not race to initialise a shared (e.g. sqlite) store."""
    if not cfg.enabled:
        return
    try:
        uri = resolve_tracking_uri(cfg.uri)
        client = open_client(uri)
        if client.get_experiment_by_name(cfg.experiment) is None:
            create_experiment(client, uri, cfg.experiment)
    except Exception as exc:  # the jobs fall back to offline metrics on their own
        print(f"[tracking] WARNING: could not prepare MLflow store ({exc}); jobs will retry", file=sys.stderr)


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The run folder's ``mlflow_run.json`` ({} when absent)."""
    path = Path(run_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        raise TrackingError(f"{path} is not valid JSON (a copy cut short?); restore it from a backup or remove it, "
                            "then sync into a new run with --uri") from None


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


def run_id_of(run_dir: str | Path) -> str | None:
    """The MLflow run of a run folder, from its record (``mlflow_run.json``); None when the run
    never reached MLflow, or the folder has no readable record."""
    try:
        return read_run_record(run_dir).get("run_id")
    except TrackingError:
        return None


def sync_offline(run_dir: str | Path, cfg: TrackingConfig, run_id: str | None,
                 before_finish: Callable[[MlflowRun, dict[str, Any]], None] | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """Complete a run in MLflow from its folder: by default the run's own MLflow run on its own store
    (both recorded in ``mlflow_run.json``), else ``run_id`` or a new run on ``cfg.uri``. Params,
    tags and name, the metrics the run does not have yet (no duplicate points: a second sync adds
    nothing), artifacts (config, encoder, curves), and the status the run ended with. Returns the
    run id and the record (whose ``model_pending`` says whether the encoder's MLflow model is still
    to be logged; ``before_finish(run, record)`` can log it). The folder gains only the run's id
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
    logged = run.client.get_run(run.run_id)
    run.pending_params = {k: v for k, v in record.get("params", {}).items() if k not in logged.data.params}
    have = {(key, m.step, m.timestamp) for key in logged.data.metrics
            for m in run.client.get_metric_history(run.run_id, key)}
    for rec in rows:
        step, t = rec.pop("step"), rec.pop("time_ms")
        run.pending.extend((k, float(v), t, step) for k, v in rec.items() if (k, step, t) not in have)
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
    if before_finish is not None:
        before_finish(run, record)
    # a run still training, or one killed hard (its record says RUNNING: nobody closed it), stays as
    # it is: closing it would hide the unclean exit that its next resume records
    holder, status = RunFolderLock(run_dir).held_elsewhere(), record.get("status")
    if holder or status in (None, "RUNNING"):
        run.finish(None)
        why = (f"is still training ({holder}); it closes its MLflow run itself" if holder else
               "ended without closing (killed hard?); resuming it continues the same MLflow run and records that")
        print(f"[simclr] note: the run in {run_dir} {why}. Its MLflow run stays RUNNING", flush=True)
    else:
        run.finish(status)
    return run.run_id or "", record
