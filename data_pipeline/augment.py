"""SimCLR's augmentations as torchvision v2 transforms, built from ``AugmentConfig`` (the one set
of parameters the DALI pipeline reads too)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from data_pipeline.config import AugmentConfig

SOLARIZE_THRESHOLD = 128  # of 0..255, as BYOL's


def blur_kernel_size(image_size: int) -> int:
    """Odd window of about 10% of the side (SimCLR), at least 3."""
    k = int(0.1 * image_size)
    return max(3, k + 1 - k % 2)


def jitter_params(cfg: AugmentConfig) -> dict[str, float]:
    s = cfg.jitter_strength
    return {"brightness": 0.8 * s, "contrast": 0.8 * s, "saturation": 0.8 * s, "hue": 0.2 * s}


def simclr_transform(cfg: AugmentConfig, image_size: int) -> v2.Compose:
    """One random view: uint8 CHW tensor in, normalised float32 CHW out."""
    steps: list = [
        v2.RandomResizedCrop(image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_prob),
        v2.RandomApply([v2.ColorJitter(**jitter_params(cfg))], p=cfg.jitter_prob),
        v2.RandomGrayscale(cfg.grayscale_prob),
    ]
    if cfg.blur_prob > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=cfg.blur_sigma)],
                                    p=cfg.blur_prob))
    if cfg.solarize_prob > 0:  # BYOL's second view: pixels at or above mid-grey inverted
        steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=cfg.solarize_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


def eval_resize_size(image_size: int) -> int:
    """ImageNet's 256 -> 224 resize before the centre crop; small images are only resized."""
    return round(image_size / 0.875) if image_size >= 128 else image_size


def eval_transform(cfg: AugmentConfig, image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.Resize(eval_resize_size(image_size), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.mean, cfg.std),
    ])


def finetune_transform(cfg: AugmentConfig, image_size: int) -> v2.Compose:
    """Supervised fine-tuning (SimCLR's semi-supervised protocol): random resized crop and flip only."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.mean, cfg.std),
    ])
