"""Typed run configuration: the only place that reads YAML.

A run is described by a YAML recipe plus ``key=value`` overrides. Everything is validated once,
here, so that a typo or an out-of-range value fails before any process group or GPU is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override; the CLI prints it and exits with status 2."""


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    cifar_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for 32-64 px images
    proj_hidden_dim: int = 0  # 0: same as the encoder's feature width (512 or 2048)
    proj_out_dim: int = 128
    sync_bn: bool = True  # convert BN to SyncBatchNorm on CUDA when world size > 1
    sync_bn_group_size: int = 0  # 0: sync across the whole world; K: within groups of K ranks
    channels_last: bool = True  # only applied on CUDA


@dataclass
class AugmentConfig:
    """SimCLR augmentation parameters: the one source of truth for every data backend."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_strength: float = 1.0  # s: brightness/contrast/saturation 0.8s, hue 0.2s
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5  # the CIFAR variant sets 0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    root: str = ""  # ImageFolder tree or .npz file
    val_root: str = ""  # held-out split for evaluation ('' = none)
    backend: Literal["auto", "dali", "torchvision"] = "auto"  # auto: dali on CUDA, else torchvision
    image_size: int = 224
    batch_size: int = 256  # GLOBAL batch (images, not views); divided evenly across ranks
    num_workers: int = 4  # DataLoader workers / DALI CPU threads per rank
    skip_corrupt: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.3  # base lr, scaled by lr_scaling with the global batch
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # linear: lr*B/256, sqrt: lr*sqrt(B)
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    trust_coefficient: float = 0.001  # LARS eta
    trust_clip: bool = False  # LARC-style clipping of the trust ratio
    exclude_bias_and_norm: bool = True  # ndim<=1 params: no weight decay, no LARS adaptation
    warmup_epochs: float = 10.0
    schedule: Literal["cosine", "constant"] = "cosine"
    final_lr_fraction: float = 0.0


@dataclass
class LossConfig:
    temperature: float = 0.1
    gather_negatives: bool = True  # negatives from the global batch across ranks


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_consecutive_nonfinite: int = 20  # stop the run after this many skipped steps in a row


@dataclass
class TrainConfig:
    epochs: int = 100
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_dir: str = "runs/default"
    log_every: int = 10
    stop_after_steps: int = 0  # >0: stop early (schedule unchanged), as a time limit would
    knn_every_epochs: int = 0  # >0: kNN monitor on data.val_root every N epochs
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    resume: str = "auto"  # auto | none | <path>


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # '' = MLflow's default local store in the working directory
    experiment: str = "simclr"
    run_name: str = ""


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: float = 600.0  # a dead or stuck rank ends the job after this long, not a hang


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


# --------------------------------------------------------------------------- loading


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, rejecting unknown keys (with the closest valid
    name) and values of the wrong type; nested dataclasses are built recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def parse_value(raw: str) -> Any:
    """A command-line value as a YAML scalar or list (``0.5`` -> float, ``[0.2, 1.0]`` -> list)."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {raw!r}: {exc}") from None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.5", "train.epochs=10"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=0.5")
        key, raw = item.split("=", 1)
        try:
            value = parse_value(raw)
        except ConfigError as exc:
            raise ConfigError(f"override {key}: {exc}") from None
        set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range; {allowed}")


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express."""
    d, o, a = cfg.data, cfg.optim, cfg.data.augment
    _check(d.batch_size > 0, "data.batch_size", d.batch_size, "must be a positive integer (global batch)")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "must be at least 8 pixels")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(cfg.loss.temperature > 0, "loss.temperature", cfg.loss.temperature, "must be > 0 (typical 0.1-0.5)")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.trust_coefficient > 0, "optim.trust_coefficient", o.trust_coefficient, "must be > 0")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    _check(0 <= o.final_lr_fraction <= 1, "optim.final_lr_fraction", o.final_lr_fraction, "must be in [0, 1]")
    _check(0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "data.augment.crop_scale", a.crop_scale,
           "must be [min, max] with 0 < min <= max <= 1")
    _check(0 < a.crop_ratio[0] <= a.crop_ratio[1], "data.augment.crop_ratio", a.crop_ratio,
           "must be [min, max] with 0 < min <= max")
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
        p = getattr(a, name)
        _check(0 <= p <= 1, f"data.augment.{name}", p, "must be a probability in [0, 1]")
    _check(a.jitter_strength >= 0, "data.augment.jitter_strength", a.jitter_strength, "must be >= 0")
    _check(0 < a.blur_sigma[0] <= a.blur_sigma[1], "data.augment.blur_sigma", a.blur_sigma,
           "must be [min, max] with 0 < min <= max")
    _check(all(s > 0 for s in a.std), "data.augment.std", a.std, "every entry must be > 0")
    _check(cfg.model.proj_hidden_dim >= 0, "model.proj_hidden_dim", cfg.model.proj_hidden_dim, "must be >= 0")
    _check(cfg.model.proj_out_dim > 0, "model.proj_out_dim", cfg.model.proj_out_dim, "must be > 0")
    _check(cfg.model.sync_bn_group_size >= 0, "model.sync_bn_group_size", cfg.model.sync_bn_group_size,
           "must be >= 0 (0 = whole world)")
    t = cfg.train
    _check(t.epochs > 0, "train.epochs", t.epochs, "must be a positive integer")
    _check(t.log_every > 0, "train.log_every", t.log_every, "must be a positive integer")
    _check(t.stop_after_steps >= 0, "train.stop_after_steps", t.stop_after_steps, "must be >= 0 (0 = off)")
    _check(t.knn_every_epochs >= 0, "train.knn_every_epochs", t.knn_every_epochs, "must be >= 0 (0 = off)")
    _check(bool(t.run_dir), "train.run_dir", t.run_dir, "must name a directory")
    c = cfg.checkpoint
    _check(c.every_steps > 0, "checkpoint.every_steps", c.every_steps, "must be a positive integer")
    _check(c.keep_last > 0, "checkpoint.keep_last", c.keep_last, "must be a positive integer")
    _check(cfg.precision.max_consecutive_nonfinite > 0, "precision.max_consecutive_nonfinite",
           cfg.precision.max_consecutive_nonfinite, "must be a positive integer")
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s", cfg.dist.timeout_s, "must be > 0 seconds")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    data = dict(data or {})
    if isinstance(data.get("precision"), str):  # shorthand `precision: bf16`
        data["precision"] = {"dtype": data["precision"]}
    return validate(build_dataclass(Config, data))


def read_yaml_mapping(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ConfigError naming ``what`` and the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; {hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "config file", "pass a recipe such as configs/demo_cpu.yaml")
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, checkpoints and MLflow."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

