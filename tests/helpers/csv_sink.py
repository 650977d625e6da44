"""A tracking sink that writes every metric to ``RUN_DIR/metrics.csv``: the example of a new
destination being one file. A run chooses it by config: ``tracking.sinks=[run_log,
tests.helpers.csv_sink:csv]`` (the module is imported, and registers it, when a run names it)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from trainer.config import TrackingConfig
from trainer.tracking.sink import Sink, register_sink


class CsvSink(Sink):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows_written = 0  # kept in the checkpoint: a resumed job appends after them

    def start(self, params: dict[str, Any], tags: dict[str, str], run_id: str | None) -> None:
        if not self.path.exists():
            self.path.write_text("step,key,value\n")

    def log_metrics(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows([step, key, value] for key, value in metrics.items())
        self.rows_written += len(metrics)

    def finish(self, status: str) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(["end", "status", status])

    def state_dict(self) -> dict[str, Any]:
        return {"rows_written": self.rows_written}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows_written = state.get("rows_written", 0)


@register_sink("csv")
def csv_sink(cfg: TrackingConfig, run_dir: Path, retry_s: float) -> CsvSink:
    return CsvSink(Path(run_dir) / "metrics.csv")
