"""The run configuration: typed dataclasses, validated once at load.

A run is described by a YAML recipe plus ``key=value`` overrides. Everything is validated here,
so that a typo or an out-of-range value fails before any process group or GPU is touched. The
data sections (``DataConfig``, ``AugmentConfig``) belong to the data pipeline; the YAML/dataclass
machinery lives in ``trainer.dataclass_yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.views import view_spec
from foundation.resume_policy import fixed, hyper, setting
from trainer.credentials import take_credentials
from trainer.dataclass_yaml import (
    ConfigError,
    Problem,
    apply_overrides,
    build_dataclass,
    failing,
    read_yaml_mapping,
    to_plain_dict,
)
from trainer.distributed import DistConfig
from trainer.encoders import ARCHS, check_arch, check_input_sizes
from trainer.losses import LossConfig
from trainer.profiling import ProfileConfig

__all__ = ["ARCHS", "AugmentConfig", "Config", "ConfigError", "DataConfig", "DistConfig", "LossConfig",
           "config_from_dict", "config_to_dict", "dump_config", "load_config"]


Device = Literal["auto", "cpu", "cuda"]  # auto: CUDA when visible
DEVICES: tuple[str, ...] = get_args(Device)


@dataclass
class ModelConfig:
    arch: str = fixed("resnet18")  # a torchvision ResNet (ARCHS) or timm/<name> (any timm model)
    cifar_stem: bool = fixed(False)  # 3x3 stride-1 first conv and no max-pool, for 32-64 px images
    proj_hidden_dim: int = fixed(0)  # 0: same as the encoder's feature width (512 or 2048)
    proj_out_dim: int = fixed(128)
    proj_layers: int = fixed(2)  # linear layers in the projection head: 2 (SimCLR v1) or 3 (SimCLRv2)
    sync_bn: bool = setting(True)  # convert BN to SyncBatchNorm on CUDA when world size > 1
    sync_bn_group_size: int = setting(0)  # 0: sync across the whole world; K: within groups of K ranks
    channels_last: bool = setting(True)  # only applied on CUDA
    compile: bool = setting(False)  # torch.compile the model (encoder + head); the first steps compile (warm-up)

    def problems(self) -> list[Problem]:
        """The fields out of range (the encoder's name and input sizes: ``validate``, which knows the views)."""
        return failing([
            (self.proj_hidden_dim >= 0, "model.proj_hidden_dim", self.proj_hidden_dim, "must be >= 0"),
            (self.proj_out_dim > 0, "model.proj_out_dim", self.proj_out_dim, "must be > 0"),
            (self.proj_layers >= 1, "model.proj_layers", self.proj_layers,
             "must be >= 1 (2: SimCLR v1's head, 3: SimCLRv2's)"),
            (self.sync_bn_group_size >= 0, "model.sync_bn_group_size", self.sync_bn_group_size,
             "must be >= 0 (0 = whole world)")])


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = hyper("lars")
    lr: float = hyper(0.3)  # base lr, scaled by lr_scaling with the global batch
    lr_scaling: Literal["linear", "sqrt", "none"] = hyper("linear")  # linear: lr*B/256, sqrt: lr*sqrt(B)
    weight_decay: float = hyper(1e-6)
    momentum: float = hyper(0.9)
    betas: tuple[float, float] = hyper((0.9, 0.999))  # adamw only
    trust_coefficient: float = hyper(0.001)  # LARS eta
    trust_clip: bool = hyper(False)  # LARC-style clipping of the trust ratio
    exclude_bias_and_norm: bool = hyper(True)  # ndim<=1 params: no weight decay, no LARS adaptation
    warmup_epochs: float = hyper(10.0)
    schedule: Literal["cosine", "constant"] = hyper("cosine")
    final_lr_fraction: float = hyper(0.0)

    def problems(self) -> list[Problem]:
        return failing([
            (self.lr > 0, "optim.lr", self.lr, "must be > 0"),
            (self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0"),
            (0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)"),
            (self.trust_coefficient > 0, "optim.trust_coefficient", self.trust_coefficient, "must be > 0"),
            (self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be >= 0"),
            (0 <= self.final_lr_fraction <= 1, "optim.final_lr_fraction", self.final_lr_fraction,
             "must be in [0, 1]")])


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = hyper("fp32")
    max_consecutive_nonfinite: int = setting(20)  # stop the run after this many skipped steps in a row

    def problems(self) -> list[Problem]:
        return failing([(self.max_consecutive_nonfinite > 0, "precision.max_consecutive_nonfinite",
                         self.max_consecutive_nonfinite, "must be a positive integer")])


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
    environment or a store (``preflight`` in trainer/loop.py checks those before a run starts). Each
    section checks its own fields (``problems()``); what spans sections is checked here."""
    for section in fields(cfg):
        for problem in getattr(cfg, section.name).problems():
            _refuse(*problem)
    check_arch(cfg.model.arch, cfg.model.cifar_stem)  # imports timm only for a timm encoder
    check_input_sizes(cfg.model.arch, cfg.model.cifar_stem, view_sizes(cfg))
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
        from trainer.recipes import find_recipe

        data = read_yaml_mapping(find_recipe(path, "configs"), "config file",
                                 "pass a recipe's name (demo_cpu, cifar10_resnet18, ...) or a YAML file")
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, checkpoints and MLflow."""
    return to_plain_dict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
