"""The tracking section of the run's config (``tracking.*``): where the run's metrics, params and
tags go; checked at load."""

from __future__ import annotations

from dataclasses import dataclass

from foundation.resume_policy import setting
from trainer.runtime.dataclass_yaml import Problem, failing


@dataclass
class TrackingConfig:
    # the destinations of the run's metrics, params and tags, by registered name (trainer/tracking/sink.py):
    # run_log (the run folder's metrics.jsonl and mlflow_run.json, what simclr sync replays), mlflow, or
    # package.module:name for one of your own
    sinks: list[str] = setting(factory=lambda: ["run_log", "mlflow"])
    enabled: bool = setting(True)  # false: the mlflow sink is off (as if left out of sinks); eval logs nowhere
    uri: str = setting("")  # '' = MLflow's default local store in the working directory
    experiment: str = setting("simclr")
    run_name: str = setting("")
    log_model: bool = setting(True)  # the finished encoder as an MLflow PyTorch model: runs:/<run_id>/encoder
    register_as: str = setting("")  # also register that model under this name in the model registry
    system_metrics: bool = setting(True)  # CPU, memory, disk, network (and GPU where NVML is present) as system/*
    system_metrics_interval_s: float = setting(10.0)

    def problems(self) -> list[Problem]:
        """Whether each sink name is registered depends on imports, not values: ``preflight`` checks that."""
        return failing([
            (self.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s", self.system_metrics_interval_s,
             "must be > 0 seconds"),
            (not self.register_as or self.log_model, "tracking.register_as", self.register_as,
             "needs tracking.log_model=true (the registered version is the logged model)"),
            (len(set(self.sinks)) == len(self.sinks), "tracking.sinks", self.sinks, "names each sink once")])
