"""What a destination of a training run's tracking is: a ``Sink``, chosen by name in
``tracking.sinks`` (``register_sink``). Every method has a do-nothing default, so a new destination
(a CSV file, TensorBoard, W&B) implements only what it records; ``tests/helpers/csv_sink.py`` is
one file. The optional capabilities (dataset inputs, a logged model, tag removal, a run id to
continue) are methods like any other: the tracker calls them on every sink and names none.

A sink that learns where the run lives (the MLflow sink: its store and run id) says so with
``self.tell(uri=..., run_id=...)``; the tracker hands those facts to every sink's ``learn`` (the
run log records them for ``simclr sync``)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.registry import registrar
from trainer.runtime.dataclass_yaml import ConfigError
from trainer.tracking.config import TrackingConfig


class Sink:
    """A destination of a training run's tracking, on rank 0. ``state_dict`` is what the checkpoint
    keeps for it (opaque to everything but the sink), handed back by ``load_state_dict`` before
    ``start`` on a resume."""

    takes_datasets = False  # whether log_datasets records anything (building the inputs costs a pass)
    run_id: str | None = None  # the run this sink writes to in its store, once it has one

    def tell(self, **facts: Any) -> None:
        """Say a fact about the run to every sink (the tracker replaces this)."""

    def learn(self, **facts: Any) -> None:
        """A fact another sink said (``uri``: where its store is; ``run_id``: the run there)."""

    def start(self, params: dict[str, Any], tags: dict[str, str], run_id: str | None) -> None:
        """A new run (``run_id`` None) or the continuation of ``run_id`` (a resumed job)."""

    def log_metrics(self, metrics: dict[str, float], step: int, time_ms: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def delete_tags(self, keys: list[str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_datasets(self, inputs: list[Any]) -> None: ...

    def log_model(self, log: Callable[[Any], str | None]) -> str | None:
        """Log the encoder as a model with ``log(self)``; its URI, or None when this sink keeps none."""
        return None

    def model_pending(self, register_as: str | None) -> None:
        """The encoder's model is still to be logged (``simclr sync`` logs it), or with None, it was."""

    def detach_run_folder(self) -> None:
        """The run folder was moved or removed: nothing more may be written where it was."""

    def discard(self) -> None:
        """A new run stopped before its first step: leave no trace of it."""

    def finish(self, status: str) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> str:
        """Where a user finds what this sink recorded ('' for nothing worth saying)."""
        return ""


# factory(tracking config, run folder, seconds between tries of a store that failed) -> Sink | None
# (None: off for this run, e.g. the MLflow sink with tracking.enabled=false)
SinkFactory = Callable[[TrackingConfig, Path, float], "Sink | None"]
SINKS: dict[str, SinkFactory] = {}
register_sink = registrar(SINKS)  # @register_sink("name"): a sink tracking.sinks can name


def check_sinks(names: list[str]) -> None:
    """Every name of ``tracking.sinks`` is a sink (its module imported): a ConfigError naming the key,
    the nearest name and the choices otherwise. Part of ``preflight``, before any rank starts."""
    for i, name in enumerate(names):
        try:
            sink_factory(name)
        except ValueError as exc:
            raise ConfigError(f"tracking.sinks[{i}]: {name!r}: {str(exc).split(': ', 1)[1]}") from None


def sink_factory(name: str) -> SinkFactory:
    """The factory registered as ``name``; ``package.module:name`` imports that module first (a sink
    of the user's own, registered there). A ValueError naming the choices otherwise."""
    module, _, short = name.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"tracking.sinks: cannot import {module} for the sink {short!r}: {exc}") from None
    if short not in SINKS:
        _register_builtin_sinks()
    if short not in SINKS:
        close = difflib.get_close_matches(short, list(SINKS), n=1)
        said = f" (did you mean {close[0]!r}?)" if close else ""
        where = f", and module {module} registers none of that name" if module else ""
        raise ValueError(f"tracking.sinks: no sink named {short!r}{said}{where}; choose from "
                         f"{', '.join(sorted(SINKS))}, or name your own as package.module:name, whose module "
                         "registers it with @register_sink")
    return SINKS[short]


def _register_builtin_sinks() -> None:
    """The shipped sinks register where they are defined; importing the package files them."""
    importlib.import_module("trainer.tracking")
