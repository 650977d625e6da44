"""The run folder's own record, the sink written first (``run_log`` in ``tracking.sinks``):
``metrics.jsonl`` (every metric) and ``mlflow_run.json`` (params, tags, name, store, run id,
end status: what ``simclr sync`` replays)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from foundation.logs import get_logger
from trainer.runtime.run_files import append_line, atomic_write_text, read_jsonl
from trainer.tracking.config import TrackingConfig
from trainer.tracking.sink import Sink, register_sink
from trainer.tracking.store import TrackingError

log = get_logger()

FAILURE_TAGS = ("simclr.failed_rank", "simclr.failure")  # a failed job's; removed when the run is resumed


RUN_RECORD = "mlflow_run.json"  # beside metrics.jsonl: the params, tags and name, for `simclr sync`


def read_metrics_file(path: str | Path, lenient: bool = False) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``step``, ``time_ms`` and the metrics); [] if absent;
    a torn last line is left out, and with ``lenient`` any damaged line (``trainer.runtime.run_files.read_jsonl``)."""
    return read_jsonl(path, lenient)


class RunLog(Sink):
    """The run folder's own record: every metric appended to ``metrics.jsonl``, and the run's params,
    tags, name, store, MLflow run id, end status and a model still to log in ``mlflow_run.json``
    (what ``simclr sync`` replays). First in ``tracking.sinks`` by default: written before any
    store is tried, and never lost when one fails."""

    def __init__(self, run_dir: str | Path, experiment: str = "", run_name: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.experiment, self.run_name = experiment, run_name
        self._record: dict[str, Any] | None = None
        self._detached = False  # the folder was moved away: nothing more is written where it was

    def log_metrics(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
        # never mkdir here: a folder moved away under the run must not come back half (RunFolderLock.check)
        if not self._detached:
            append_line(self.metrics_file, json.dumps({"step": step, "time_ms": time_ms, **metrics}))

    def begin(self, params: dict[str, Any]) -> None:
        """A new run's record (a resumed run adds to the one its first job wrote)."""
        self._record = {"experiment": self.experiment, "run_name": self.run_name,
                        "params": {k: str(v) for k, v in params.items()}, "tags": {}}

    def start(self, params: dict[str, Any], tags: dict[str, str], run_id: str | None) -> None:
        if run_id is not None:  # a resumed run adds to its record, or writes it again when it is damaged
            try:
                read_run_record(self.run_dir)
            except TrackingError as exc:  # a derived file: written again from this job and the checkpoint
                log.warning(f"{str(exc).split(';')[0]}; written again from this job's params and the "
                            f"checkpoint's MLflow run {run_id}")
                self.begin(params)
                self.update(run_id=run_id)
        else:
            self.begin(params)
        self.update(tags=tags, status="RUNNING")  # until finish: a hard kill leaves RUNNING

    def update(self, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, **fields: Any) -> None:
        """Add ``params`` and ``tags``; ``fields``: its store (``uri``), ``run_id``, the ``status``
        it ended with and a model still to log (``model_pending``)."""
        if self._detached:
            return
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

    def learn(self, **facts: Any) -> None:
        """Where the run lives in a store (``uri``, ``run_id``): what ``simclr sync`` needs to go on."""
        self.update(**{k: v for k, v in facts.items() if k in ("uri", "run_id")})

    def log_params(self, params: dict[str, Any]) -> None:
        self.update(params=params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.update(tags=tags)

    def delete_tags(self, keys: list[str]) -> None:
        self.update(drop_tags=keys)

    def model_pending(self, register_as: str | None) -> None:
        self.update(model_pending=None if register_as is None else {"register_as": register_as})

    def detach_run_folder(self) -> None:
        self._detached = True

    def discard(self) -> None:
        for name in (RUN_RECORD, "config.yaml"):
            (self.run_dir / name).unlink(missing_ok=True)

    def finish(self, status: str) -> None:
        self.update(status=status)

    def describe(self) -> str:
        return f"metrics in {self.metrics_file}"


@register_sink("run_log")
def run_log_sink(cfg: TrackingConfig, run_dir: Path, retry_s: float) -> RunLog:
    return RunLog(run_dir, cfg.experiment, cfg.run_name)


def earlier_failures(run_dir: str | Path) -> dict[str, str]:
    """A job that failed (a rank died) is resumed: the tag ``simclr.earlier_failures`` that keeps
    what its record's failure tags (``FAILURE_TAGS``) said, so that those can go and a run that then
    finishes does not read as failed ({} when the record has none)."""
    try:
        tags = read_run_record(run_dir).get("tags", {})
    except TrackingError:  # damaged: the run log writes it again, and what it said is lost
        return {}
    if "simclr.failed_rank" not in tags:
        return {}
    said = f"rank {tags['simclr.failed_rank']}: {tags.get('simclr.failure', '?')}"
    earlier = "; ".join(filter(None, [tags.get("simclr.earlier_failures", ""), said]))
    return {"simclr.earlier_failures": earlier[-5000:]}


def last_logged_step(run_dir: str | Path) -> int:
    """The last step in the run folder's ``metrics.jsonl`` (0: none)."""
    rows = read_metrics_file(Path(run_dir) / "metrics.jsonl", lenient=True)
    return max((int(r.get("step", 0)) for r in rows), default=0)


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The run folder's ``mlflow_run.json`` ({} when absent)."""
    path = Path(run_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        raise TrackingError(f"{path} is not valid JSON (a copy cut short?); restore it from a backup or remove it, "
                            "then sync into a new run with --uri") from None


def run_id_of(run_dir: str | Path) -> str | None:
    """The MLflow run of a run folder, from its record (``mlflow_run.json``); None when the run
    never reached MLflow, or the folder has no readable record."""
    try:
        return read_run_record(run_dir).get("run_id")
    except TrackingError:
        return None
