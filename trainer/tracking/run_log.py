"""The run folder's own record, the sink that is always there and written first:
``metrics.jsonl`` (every metric) and ``mlflow_run.json`` (params, tags, name, store, run id,
end status: what ``simclr sync`` replays)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.run_files import append_line, atomic_write_text, read_jsonl
from trainer.tracking.store import TrackingError

FAILURE_TAGS = ("simclr.failed_rank", "simclr.failure")  # a failed job's; removed when the run is resumed


RUN_RECORD = "mlflow_run.json"  # beside metrics.jsonl: the params, tags and name, for `simclr sync`


def read_metrics_file(path: str | Path, lenient: bool = False) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``step``, ``time_ms`` and the metrics); [] if absent;
    a torn last line is left out, and with ``lenient`` any damaged line (``trainer.run_files.read_jsonl``)."""
    return read_jsonl(path, lenient)


class RunLog:
    """The run folder's own record, written first and never lost: every metric appended to
    ``metrics.jsonl``, and the run's params, tags, name, store, MLflow run id, end status and a
    model still to log in ``mlflow_run.json`` (what ``simclr sync`` replays)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self._record: dict[str, Any] | None = None

    def log_metrics(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
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


    def log_params(self, params: dict[str, Any]) -> None:
        self.update(params=params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.update(tags=tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Nothing to do: the run's artifacts are files of this folder already."""

    def finish(self, status: str) -> None:
        self.update(status=status)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the folder is its own state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

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
