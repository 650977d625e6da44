"""The data pipeline's own settings: where images come from and how the two views are made.

Plain dataclasses; the trainer's config composes them as ``data`` and validates them at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
    labels: Literal["auto", "folders", "none"] = "auto"  # image folders: class sub-folders, or none (unlabeled)
    backend: Literal["auto", "dali", "torchvision"] = "auto"  # auto: dali on CUDA, else torchvision
    image_size: int = 224
    batch_size: int = 256  # GLOBAL batch (images, not views); divided evenly across ranks
    num_workers: int = 4  # DataLoader workers / DALI CPU threads per rank
    prefetch_depth: int = 2  # DALI: batches prepared ahead of the one being trained on
    on_device: bool = False  # DALI, array datasets: keep every image on the device once, gather batches there
    skip_corrupt: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
