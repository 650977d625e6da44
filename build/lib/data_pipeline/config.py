"""The data pipeline's own settings: where images come from and how the two views are made.

Plain dataclasses; the trainer's config composes them as ``data`` and validates them at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from data_pipeline.arrays import STL10_SPLITS
from data_pipeline.sources import DataError, LabelMode


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
    root: str = ""  # image folder, .npz, STL-10 or CIFAR folder, or tar shards (see README: data layouts)
    split: str = ""  # of an STL-10 (unlabeled|train|test|train+unlabeled) or CIFAR (train|test) folder
    val_root: str = ""  # held-out set for evaluation ('' = none)
    val_split: str = ""  # split of val_root, as for split
    labels: LabelMode = "auto"  # image folders: class sub-folders, or none (unlabeled)
    backend: Literal["auto", "dali", "torchvision"] = "auto"  # auto: dali on CUDA, else torchvision
    image_size: int = 224
    batch_size: int = 256  # GLOBAL batch (images, not views); divided evenly across ranks
    num_workers: int = 4  # DataLoader workers / DALI CPU threads per rank
    prefetch_depth: int = 2  # DALI: batches prepared ahead of the one being trained on
    on_device: bool = False  # DALI, array datasets: keep every image on the device once, gather batches there
    skip_corrupt: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, what is allowed) for each field out of range, checks that types alone cannot
        express; the run's config raises the first at load."""
        a = self.augment
        checks = [
            (self.batch_size >= 2, "data.batch_size", self.batch_size,
             "must be at least 2 (global batch): with one image there are no negatives and the loss is 0"),
            (self.image_size >= 8, "data.image_size", self.image_size, "must be at least 8 pixels"),
            (self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0"),
            (self.prefetch_depth >= 1, "data.prefetch_depth", self.prefetch_depth,
             "must be >= 1 (batches DALI prepares ahead)"),
            *((split in ("", *STL10_SPLITS), name, split, f"must be one of {', '.join(STL10_SPLITS)} (STL-10; "
               "CIFAR: train, test) or empty for a set with no splits")
              for name, split in (("data.split", self.split), ("data.val_split", self.val_split))),
            (0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "data.augment.crop_scale", a.crop_scale,
             "must be [min, max] with 0 < min <= max <= 1"),
            (0 < a.crop_ratio[0] <= a.crop_ratio[1], "data.augment.crop_ratio", a.crop_ratio,
             "must be [min, max] with 0 < min <= max"),
            *((0 <= getattr(a, name) <= 1, f"data.augment.{name}", getattr(a, name), "must be a probability in [0, 1]")
              for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob")),
            (a.jitter_strength >= 0, "data.augment.jitter_strength", a.jitter_strength, "must be >= 0"),
            (0 < a.blur_sigma[0] <= a.blur_sigma[1], "data.augment.blur_sigma", a.blur_sigma,
             "must be [min, max] with 0 < min <= max"),
            (all(s > 0 for s in a.std), "data.augment.std", a.std, "every entry must be > 0"),
        ]
        return [(key, value, allowed) for ok, key, value, allowed in checks if not ok]


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
