"""A trained encoder back from disk, for eval, embed, sync and the benchmarks: from a training
checkpoint (optionally with layers of its projection head), or from an exported ``encoder.pt``
with its run's ``config.yaml`` beside it; and its random-init twin, the baseline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from trainer.config import Config, config_from_dict, load_config
from trainer.model.encoders import build_encoder, check_input_sizes
from trainer.model.simclr import SimCLRModel, head_features
from trainer.state.checkpoint import CheckpointError, SavedWeights, load_weights


def load_encoder(path: str | Path, head_layers: int = 0) -> tuple[nn.Module, Config]:
    """An encoder from a training checkpoint, or from an exported encoder state dict (``encoder.pt``
    under any name) whose run's ``config.yaml`` sits beside it. Returns it with the run's config.
    ``head_layers`` > 0: the encoder followed by that many layers of the projection head (a
    training checkpoint holds the head; an exported encoder does not)."""
    saved = load_weights(path)
    if head_layers:
        encoder, cfg = _load_with_head(saved, head_layers)
    else:
        encoder, cfg = _load_encoder_only(saved, path)
    # evaluation and embedding read images at data.image_size, which a run with data.views never trained at
    check_input_sizes(cfg.model.arch, cfg.model.cifar_stem,
                      [("data.image_size (the size evaluation reads images at)", None, cfg.data.image_size)])
    return encoder, cfg


def _load_encoder_only(saved: SavedWeights, path: str | Path) -> tuple[nn.Module, Config]:
    if saved.is_checkpoint:
        cfg, source = config_from_dict(saved.config), f"the config stored in {path}"
    else:
        cfg_file = saved.path.parent / "config.yaml"
        if not cfg_file.exists():
            raise CheckpointError(f"{path} is an exported encoder; it needs its run's config.yaml beside it to know "
                                  "the architecture (copy it from the run folder)")
        cfg, source = load_config(cfg_file), str(cfg_file)
    weights = saved.encoder()
    encoder = build_encoder(cfg.model.arch, cfg.model.cifar_stem)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise CheckpointError(f"the weights in {path} do not fit a {cfg.model.arch} encoder (cifar_stem="
                              f"{cfg.model.cifar_stem}) as {source} says: {len(missing)} tensors missing, "
                              f"{len(unexpected)} unexpected, {len(reshaped)} of another shape (e.g. {example}); "
                              "use the config of the run that trained them")
    encoder.load_state_dict(weights)
    return encoder, cfg


def _load_with_head(saved: SavedWeights, head_layers: int) -> tuple[nn.Module, Config]:
    if not saved.is_checkpoint:
        raise CheckpointError(f"--head-layers {head_layers} reads the projection head, which only a training "
                              f"checkpoint holds; {saved.path} is not one: pass a step_N.pt from the run's "
                              "checkpoints/")
    cfg = config_from_dict(saved.config)
    if not 0 < head_layers <= cfg.model.proj_layers:
        raise CheckpointError(f"--head-layers {head_layers}: the run's projection head has {cfg.model.proj_layers} "
                              f"layers (model.proj_layers); use 0 to {cfg.model.proj_layers}")
    model = SimCLRModel(dataclasses.replace(cfg.model, sync_bn=False))
    model.load_state_dict(saved.model)
    return head_features(model, head_layers), cfg


def random_init_like(cfg: Config, head_layers: int = 0) -> nn.Module:
    """The baseline: the same architecture (and head layers) at random initialisation."""
    return head_features(SimCLRModel(dataclasses.replace(cfg.model, sync_bn=False)), head_layers)
