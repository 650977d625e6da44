"""A tracking sink that writes every metric to ``RUN_DIR/metrics.csv``: the example of a new
destination being one file plus its registration (the tests import this module to register it)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from trainer.config import TrackingConfig
from trainer.tracking.tracker import register_sink


class CsvSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows_written = 0  # kept in the checkpoint: a resumed job appends after them

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        if not self.path.exists():
            self.path.write_text("step,key,value\n")

    def log_metrics(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows([step, key, value] for key, value in metrics.items())
        self.rows_written += len(metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(["end", "status", status])

    def state_dict(self) -> dict[str, Any]:
        return {"rows_written": self.rows_written}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows_written = state.get("rows_written", 0)


@register_sink("csv")
def csv_sink(cfg: TrackingConfig, run_dir: Path) -> CsvSink:
    return CsvSink(Path(run_dir) / "metrics.csv")
