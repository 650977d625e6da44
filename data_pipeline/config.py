"""The data pipeline's own settings: where images come from and how the two views are made.

Plain dataclasses; the trainer's config composes them as ``data`` and validates them at load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from data_pipeline.arrays import STL10_SPLITS
from data_pipeline.sources import DataError, LabelMode
from foundation.resume_policy import fixed, hyper, setting


@dataclass
class AugmentConfig:
    """SimCLR augmentation parameters: the one source of truth for every data backend."""

    crop_scale: tuple[float, float] = hyper((0.08, 1.0))
    crop_ratio: tuple[float, float] = hyper((3 / 4, 4 / 3))
    flip_prob: float = hyper(0.5)
    jitter_strength: float = hyper(1.0)  # s: brightness/contrast/saturation 0.8s, hue 0.2s
    jitter_prob: float = hyper(0.8)
    grayscale_prob: float = hyper(0.2)
    blur_prob: float = hyper(0.5)  # the CIFAR variant sets 0
    blur_sigma: tuple[float, float] = hyper((0.1, 2.0))
    solarize_prob: float = hyper(0.0)  # BYOL's second view: 0.2
    mean: tuple[float, float, float] = hyper((0.485, 0.456, 0.406))
    std: tuple[float, float, float] = hyper((0.229, 0.224, 0.225))


MIN_SIZE = 8


@dataclass
class SizeSchedule:
    """A crop size that grows (or shrinks) linearly over epochs, FFCV's progressive resizing: ``start``
    px until ``from_epoch``, ``end`` px from ``to_epoch`` on, in between the linear value rounded to a
    multiple of ``step`` (changing only at epoch boundaries)."""

    start: int = 160
    end: int = 224
    from_epoch: int = 0
    to_epoch: int = 0
    step: int = 32

    def at(self, epoch: int) -> int:
        if epoch <= self.from_epoch:
            return self.start
        if epoch >= self.to_epoch:
            return self.end
        value = self.start + (self.end - self.start) * (epoch - self.from_epoch) / (self.to_epoch - self.from_epoch)
        return max(MIN_SIZE, int(round(value / self.step)) * self.step)


@dataclass
class ViewGroup:
    """``count`` views of ``size`` px (0: ``data.image_size``; a ``SizeSchedule``; or a list of
    ``[epoch, size]`` steps). Every other field overrides ``data.augment`` for this group only
    (unset: the run's value)."""

    count: int = 2
    size: int | SizeSchedule | list[tuple[int, int]] = 0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    flip_prob: float | None = None
    jitter_strength: float | None = None
    jitter_prob: float | None = None
    grayscale_prob: float | None = None
    blur_prob: float | None = None
    blur_sigma: tuple[float, float] | None = None
    solarize_prob: float | None = None

    def size_at(self, epoch: int, image_size: int) -> int:
        """The crop size in force at ``epoch``."""
        if isinstance(self.size, SizeSchedule):
            return self.size.at(epoch)
        if isinstance(self.size, list):
            return [size for at, size in self.size if at <= epoch][-1]
        return self.size or image_size

    def augment(self, base: AugmentConfig) -> AugmentConfig:
        """``base`` with this group's overrides."""
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)
                     if hasattr(self, f.name) and getattr(self, f.name) is not None}
        return dataclasses.replace(base, **overrides)

    def problems(self, key: str, base: AugmentConfig) -> list[tuple[str, Any, str]]:
        """(key, value, what is allowed) for each bad field, as ``DataConfig.problems``."""
        found: list[tuple[str, Any, str]] = []
        if self.count < 1:
            found.append((f"{key}.count", self.count, "must be at least 1 view (drop the group to have none)"))
        size = self.size
        if isinstance(size, SizeSchedule):
            for name in ("start", "end"):
                if getattr(size, name) < MIN_SIZE:
                    found.append((f"{key}.size.{name}", getattr(size, name), f"must be at least {MIN_SIZE} pixels"))
            if size.from_epoch < 0 or size.to_epoch < size.from_epoch:
                found.append((f"{key}.size", f"from_epoch={size.from_epoch}, to_epoch={size.to_epoch}",
                              "the schedule must end after it starts: 0 <= from_epoch <= to_epoch"))
            if size.step < 1:
                found.append((f"{key}.size.step", size.step, "must be at least 1 pixel (FFCV rounds to 32)"))
        elif isinstance(size, list):
            epochs = [at for at, _ in size]
            if not size or epochs[0] != 0 or epochs != sorted(set(epochs)):
                found.append((f"{key}.size", size, "a list of [epoch, size] steps must start at epoch 0 with "
                              "epochs increasing, e.g. [[0, 160], [40, 192], [80, 224]]"))
            if any(s < MIN_SIZE for _, s in size):
                found.append((f"{key}.size", size, f"every size must be at least {MIN_SIZE} pixels"))
        elif size != 0 and size < MIN_SIZE:
            found.append((f"{key}.size", size, f"must be at least {MIN_SIZE} pixels (0: data.image_size)"))
        return found + augment_problems(self.augment(base), key)


def augment_problems(a: AugmentConfig, key: str = "data.augment") -> list[tuple[str, Any, str]]:
    """(key, value, what is allowed) for each augmentation parameter out of range."""
    checks = [
        (0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "crop_scale", a.crop_scale,
         "must be [min, max] with 0 < min <= max <= 1"),
        (0 < a.crop_ratio[0] <= a.crop_ratio[1], "crop_ratio", a.crop_ratio, "must be [min, max] with 0 < min <= max"),
        *((0 <= getattr(a, name) <= 1, name, getattr(a, name), "must be a probability in [0, 1]")
          for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob")),
        (a.jitter_strength >= 0, "jitter_strength", a.jitter_strength, "must be >= 0"),
        (0 < a.blur_sigma[0] <= a.blur_sigma[1], "blur_sigma", a.blur_sigma, "must be [min, max] with 0 < min <= max"),
        (all(s > 0 for s in a.std), "std", a.std, "every entry must be > 0"),
    ]
    return [(f"{key}.{name}", value, allowed) for ok, name, value, allowed in checks if not ok]


@dataclass
class DataConfig:
    root: str = setting("")  # image folder, .npz, STL-10 or CIFAR folder, or tar shards, local or s3:// (docs/data.md)
    split: str = hyper("")  # of an STL-10 (unlabeled|train|test|train+unlabeled) or CIFAR (train|test) folder
    val_root: str = setting("")  # held-out set for evaluation ('' = none)
    val_split: str = setting("")  # split of val_root, as for split
    labels: LabelMode = hyper("auto")  # image folders: class sub-folders, or none (unlabeled)
    backend: Literal["auto", "dali", "torchvision"] = setting("auto")  # auto: dali on CUDA, else torchvision
    image_size: int = hyper(224)
    batch_size: int = fixed(256)  # GLOBAL batch (images, not views); divided evenly across ranks
    num_workers: int = setting(4)  # DataLoader workers / DALI CPU threads per rank
    prefetch_depth: int = setting(2)  # DALI: batches prepared ahead of the one being trained on
    on_device: bool = setting(False)  # DALI, array datasets: keep every image on the device once, gather batches there
    skip_corrupt: bool = setting(False)
    # a root in object storage (s3://bucket/prefix, data_pipeline.remote_shards): how long the store may fail
    # before the run stops, the shards each rank fetches ahead, and an optional local cache of whole shards
    store_timeout_s: float = setting(120.0)
    read_ahead_shards: int = setting(2)
    store_cache: str = setting("")
    store_cache_gb: float = setting(20.0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # view groups (data_pipeline.views): [] = two views of image_size with `augment`; e.g. multi-crop
    # [{count: 2, size: 224, crop_scale: [0.14, 1]}, {count: 6, size: 96, crop_scale: [0.05, 0.14]}]
    views: list[ViewGroup] = hyper(factory=list)

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, what is allowed) for each field out of range, checks that types alone cannot
        express; the run's config raises the first at load."""
        checks = [
            (self.batch_size >= 2, "data.batch_size", self.batch_size,
             "must be at least 2 (global batch): with one image there are no negatives and the loss is 0"),
            (self.image_size >= 8, "data.image_size", self.image_size, "must be at least 8 pixels"),
            (self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0"),
            (self.prefetch_depth >= 1, "data.prefetch_depth", self.prefetch_depth,
             "must be >= 1 (batches DALI prepares ahead)"),
            (self.store_timeout_s > 0, "data.store_timeout_s", self.store_timeout_s,
             "must be > 0 (seconds the object store may fail before the run stops)"),
            (self.read_ahead_shards >= 1, "data.read_ahead_shards", self.read_ahead_shards,
             "must be >= 1 (shards each rank fetches ahead from object storage)"),
            (self.store_cache_gb > 0, "data.store_cache_gb", self.store_cache_gb,
             "must be > 0 (the size cap of data.store_cache)"),
            *((split in ("", *STL10_SPLITS), name, split, f"must be one of {', '.join(STL10_SPLITS)} (STL-10; "
               "CIFAR: train, test) or empty for a set with no splits")
              for name, split in (("data.split", self.split), ("data.val_split", self.val_split))),
        ]
        found = [(key, value, allowed) for ok, key, value, allowed in checks if not ok] + augment_problems(self.augment)
        for i, group in enumerate(self.views):
            found += group.problems(f"data.views[{i}]", self.augment)
        if self.views and sum(g.count for g in self.views) < 2:
            found.append(("data.views", [g.count for g in self.views],
                          "needs at least 2 views in all (a view's positives are the other views of its image)"))
        return found


def check_world_size(batch_size: int, world_size: int, ranks: str = "", knob: str = "",
                     resumed: bool = False, error: type[Exception] = DataError) -> None:
    """The one rule for how a global batch meets a world size: it divides evenly over the ranks.
    For the message: ``ranks`` says who starts them, ``knob`` what sets their number (``--nproc``);
    ``resumed``: the run's checkpoints fix the batch, so only the world size can change."""
    if batch_size % world_size == 0:
        return
    valid = ", ".join(str(w) for w in range(1, batch_size + 1) if batch_size % w == 0)
    who = f"the {world_size} ranks {ranks}" if ranks else f"{world_size} ranks"
    choose = f"{knob} among {valid}" if knob else f"one of the valid world sizes for this batch: {valid}"
    fix = (f"the run keeps its batch (its checkpoints fix it: it resumes with data.batch_size={batch_size}), so use "
           f"{choose}" if resumed
           else f"use a multiple of {world_size} as data.batch_size, or {choose}")
    raise error(f"data.batch_size={batch_size} (global) does not divide over {who}; {fix}")
