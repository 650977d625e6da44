"""A training run's tracking: one ``Tracker`` feeding the sinks ``tracking.sinks`` names (the run
log and MLflow by default), as torchtitan's logger container. The tracker orders the run's events
(start, metrics, tags, artifacts, the model, finish) and names no sink: a sink's optional
capabilities are methods with do-nothing defaults (``trainer/tracking/sink.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.tracking.config import TrackingConfig
from trainer.tracking.run_log import FAILURE_TAGS, earlier_failures, last_logged_step
from trainer.tracking.sink import SINKS, Sink, register_sink, sink_factory

__all__ = ["SINKS", "Sink", "Tracker", "register_sink"]


class Tracker:
    """A training run's tracking. On rank 0 (``active``) every call goes to each sink of
    ``tracking.sinks`` in order; on other ranks every call is a no-op."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, active: bool, retry_s: float = 30.0) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.local_file = self.run_dir / "metrics.jsonl"  # the run folder's metrics (the run_log sink's)
        self.sinks: dict[str, Sink] = {}  # by name: each sink's part of the checkpoint's state
        if active:
            for name in cfg.sinks:
                sink = sink_factory(name)(cfg, self.run_dir, retry_s)
                if sink is not None:
                    sink.tell = self._tell
                    self.sinks[name.rpartition(":")[2]] = sink
        self._loaded: dict[str, Any] = {}  # the checkpoint's state, kept for sinks this job does not run
        self._started = self._finished = False
        self.logged_through = 0  # a resumed run's last step already in metrics.jsonl (and MLflow): not logged again

    def _tell(self, **facts: Any) -> None:
        for sink in self.sinks.values():
            sink.learn(**facts)

    @staticmethod
    def run_id_in(state: dict[str, Any]) -> str | None:
        """The run (in a sink's store) a checkpoint's tracking state continues (None: none)."""
        return next((part["run_id"] for part in (state or {}).values()
                     if isinstance(part, dict) and part.get("run_id")), None)

    @property
    def run_id(self) -> str | None:
        return next((sink.run_id for sink in self.sinks.values() if sink.run_id), None) or self.run_id_in(self._loaded)

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
        """Start a new run (log params and tags), or continue the one the loaded state names; the run id."""
        if not self.sinks:
            return None
        self._started = True
        run_id = self.run_id
        resolved = {}
        if run_id is not None:
            # a job resumed from a checkpoint older than its last logged step recomputes those steps
            # (bitwise, or with the changes it records): the values already logged stand
            self.logged_through = last_logged_step(self.run_dir)
            resolved = earlier_failures(self.run_dir)
        for sink in self.sinks.values():
            sink.start(params, {**tags, **resolved}, run_id)
        if resolved:  # a failed job was resumed: its failure tags go, kept in simclr.earlier_failures
            self.delete_tags(list(FAILURE_TAGS))
        return self.run_id

    def discard(self) -> None:
        """A new run stopped before its first step: it goes, as if it had never started (a resumed
        run is only closed)."""
        self._finished = True
        for sink in self.sinks.values():
            sink.discard()

    @property
    def takes_datasets(self) -> bool:
        """Whether a sink records dataset inputs (building them costs a pass over the listing)."""
        return any(sink.takes_datasets for sink in self.sinks.values())

    def log_datasets(self, inputs: list[Any]) -> None:
        for sink in self.sinks.values():
            sink.log_datasets(inputs)

    def detach_run_folder(self) -> None:
        """The run folder was moved or removed: nothing more is written where it was."""
        for sink in self.sinks.values():
            sink.detach_run_folder()

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
        """Tags that no longer hold (an early stop, once the run finished)."""
        for sink in self.sinks.values():
            sink.delete_tags(keys)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for sink in self.sinks.values():
            sink.log_artifact(path, artifact_path)

    def log_model(self, log: Callable[[Any], str | None]) -> str | None:
        """Log the encoder as a model with ``log(sink)`` (trainer/evaluation/export.py) into every sink that keeps
        models; the first model URI, or None when none did (``simclr sync`` logs it later)."""
        uris = [sink.log_model(log) for sink in self.sinks.values()]
        return next((uri for uri in uris if uri), None)

    def model_pending(self, register_as: str | None) -> None:
        """Record that the encoder's model is still to be logged (``simclr sync`` logs it), or, with
        None, that it was."""
        for sink in self.sinks.values():
            sink.model_pending(register_as)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` in every sink (once)."""
        if not self.sinks or not self._started or self._finished:
            return
        self._finished = True
        for sink in self.sinks.values():
            sink.finish(status)

    def describe(self) -> str:
        said = [sink.describe() for sink in self.sinks.values()]
        return "; ".join(s for s in said if s) or "no tracking sinks (tracking.sinks is empty)"
