"""The run configuration: typed dataclasses, validated once at load.

A run is described by a YAML recipe plus ``key=value`` overrides. Everything is validated here,
so that a typo or an out-of-range value fails before any process group or GPU is touched. The
data sections (``DataConfig``, ``AugmentConfig``) belong to the data pipeline; the YAML/dataclass
machinery lives in ``trainer.runtime.dataclass_yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.views import view_spec
from foundation.resume_policy import hyper, setting
from trainer.losses import LossConfig
from trainer.model.encoders import ARCHS, check_arch, check_input_sizes
from trainer.model.optim import OptimConfig
from trainer.model.precision import PrecisionConfig
from trainer.model.simclr import ModelConfig
from trainer.observe.profiling import ProfileConfig
from trainer.runtime.credentials import take_credentials
from trainer.runtime.dataclass_yaml import (
    ConfigError,
    Problem,
    apply_overrides,
    build_dataclass,
    failing,
    read_yaml_mapping,
    to_plain_dict,
)
from trainer.runtime.device import check_backend
from trainer.runtime.distributed import DistConfig
from trainer.tracking.config import TrackingConfig

__all__ = ["ARCHS", "AugmentConfig", "Config", "ConfigError", "DataConfig", "DistConfig", "LossConfig",
           "config_from_dict", "config_to_dict", "dump_config", "load_config"]


Device = Literal["auto", "cpu", "cuda"]  # auto: CUDA when visible
DEVICES: tuple[str, ...] = get_args(Device)


@dataclass
class TrainConfig:
    epochs: int = hyper(100)
    seed: int = hyper(0)
    device: Device = setting("auto")
    run_dir: str = setting("runs/default")
    log_every: int = setting(10)
    stop_after_steps: int = setting(0)  # >0: stop early (schedule unchanged), as a time limit would
    knn_every_epochs: int = setting(0)  # >0: kNN monitor on data.val_root every N epochs
    online_probe: bool = setting(True)  # a linear classifier on the detached features (labelled data)
    stop_check_every: int = setting(10)  # multi-rank runs agree on a stop request (pre-emption, Ctrl-C) every N steps
    progress_bar: bool = setting(True)
    overwrite: bool = setting(False)  # with checkpoint.resume=none: replace an earlier run's checkpoints in run_dir
    micro_batch: int = setting(0)  # >0: gradient caching, chunks of this many images per rank (grad_cache.py)
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # torch.profiler traces of chosen steps

    def problems(self) -> list[Problem]:
        return failing([
            (self.epochs > 0, "train.epochs", self.epochs, "must be a positive integer"),
            (self.log_every > 0, "train.log_every", self.log_every, "must be a positive integer"),
            (self.stop_after_steps >= 0, "train.stop_after_steps", self.stop_after_steps, "must be >= 0 (0 = off)"),
            (self.micro_batch >= 0, "train.micro_batch", self.micro_batch,
             "must be >= 0 (0 = one pass; N = gradient caching in chunks of N images per rank)"),
            (self.stop_check_every > 0, "train.stop_check_every", self.stop_check_every,
             "must be a positive integer (steps between agreements on a stop request)"),
            (self.knn_every_epochs >= 0, "train.knn_every_epochs", self.knn_every_epochs, "must be >= 0 (0 = off)"),
            (bool(self.run_dir), "train.run_dir", self.run_dir, "must name a directory")]) + self.profile.problems()


@dataclass
class CheckpointConfig:
    every_steps: int = setting(500)
    keep_last: int = setting(3)
    resume: str = setting("auto")  # auto | none | <path>
    # a resume with other hyper-parameters or another dataset than the checkpoint's: refused unless true,
    # then recorded in MLflow as a change at that step (config.yaml keeps the original)
    allow_changes: bool = setting(False)

    def problems(self) -> list[Problem]:
        return failing([
            (self.every_steps > 0, "checkpoint.every_steps", self.every_steps, "must be a positive integer"),
            (self.keep_last > 0, "checkpoint.keep_last", self.keep_last, "must be a positive integer")])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def _refuse(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}: {value!r} is out of range; {allowed}")


def expand_paths(cfg: Config) -> Config:
    """``~`` in path keys (a shell leaves ``key=~/x`` alone), expanded once at load."""
    def expand(path: str) -> str:
        return str(Path(path).expanduser()) if path.startswith("~") else path

    cfg.train.run_dir = expand(cfg.train.run_dir)
    cfg.data.root, cfg.data.val_root = expand(cfg.data.root), expand(cfg.data.val_root)
    if cfg.checkpoint.resume not in ("auto", "none"):
        cfg.checkpoint.resume = expand(cfg.checkpoint.resume)
    return cfg


def view_sizes(cfg: Config) -> list[tuple[str, int | None, int]]:
    """(the view group's key, epoch, size) of every view group at every epoch of the run."""
    spec = view_spec(cfg.data)
    return [(f"data.views[{i}]" if cfg.data.views else "data.image_size", epoch, group.size_at(epoch, spec.image_size))
            for epoch in range(max(cfg.train.epochs, 0)) for i, group in enumerate(spec.groups)]


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express: the values alone, never the file system, the
    environment or a store (``preflight`` in trainer/run/loop.py checks those before a run starts). Each
    section checks its own fields (``problems()``); what spans sections is checked here."""
    for section in fields(cfg):
        for problem in getattr(cfg, section.name).problems():
            _refuse(*problem)
    check_arch(cfg.model.arch, cfg.model.cifar_stem)  # imports timm only for a timm encoder
    check_input_sizes(cfg.model.arch, cfg.model.cifar_stem, view_sizes(cfg))
    if cfg.train.device == "cpu":
        check_backend(cfg.dist.backend, "cpu", "cpu")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    data = dict(data or {})
    if isinstance(data.get("precision"), str):  # shorthand `precision: bf16`
        data["precision"] = {"dtype": data["precision"]}
    cfg = build_dataclass(Config, data)
    # a password in the URI moves to MLflow's environment here, before anything prints or stores the config
    cfg.tracking.uri = take_credentials(cfg.tracking.uri)
    return validate(expand_paths(cfg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (a path, or a shipped recipe's name; the defaults when ``path`` is None)
    and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        from trainer.runtime.recipes import find_recipe

        data = read_yaml_mapping(find_recipe(path, "configs"), "config file",
                                 "pass a recipe's name (demo_cpu, cifar10_resnet18, ...) or a YAML file")
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, checkpoints and MLflow."""
    return to_plain_dict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
