"""The SimCLR model: an encoder (``trainer.model.encoders``: a torchvision ResNet or any timm model,
random init) and SimCLR's projection head; SyncBatchNorm and channels_last as configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from foundation import collectives
from foundation.resume_policy import fixed, setting
from trainer.model.encoders import build_encoder, feature_dim
from trainer.model.sync_batchnorm import convert_sync_batchnorm
from trainer.runtime.dataclass_yaml import ConfigError, Problem, failing


@dataclass
class ModelConfig:
    arch: str = fixed("resnet18")  # a torchvision ResNet (ARCHS) or timm/<name> (any timm model)
    cifar_stem: bool = fixed(False)  # 3x3 stride-1 first conv and no max-pool, for 32-64 px images
    proj_hidden_dim: int = fixed(0)  # 0: same as the encoder's feature width (512 or 2048)
    proj_out_dim: int = fixed(128)
    proj_layers: int = fixed(2)  # linear layers in the projection head: 2 (SimCLR v1) or 3 (SimCLRv2)
    sync_bn: bool = setting(True)  # BatchNorm's statistics over the ranks, whenever a process group exists
    sync_bn_group_size: int = setting(0)  # 0: sync across the whole world; K: within blocks of K ranks (K divides it)
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


class ProjectionHead(nn.Sequential):
    """``layers - 1`` blocks of Linear - BN - ReLU, then a Linear: 2 layers is SimCLR v1's head,
    3 SimCLRv2's. ``list(head)[: 3 * k]`` is the head's first k layers (SimCLRv2 fine-tunes from there)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> None:
        blocks: list[nn.Module] = []
        for k in range(layers - 1):
            blocks += [nn.Linear(in_dim if k == 0 else hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                       nn.ReLU(inplace=True)]
        blocks.append(nn.Linear(hidden_dim if layers > 1 else in_dim, out_dim))
        super().__init__(*blocks)


class ModelOutput(NamedTuple):
    features: list[torch.Tensor]  # the encoder's pooled features, one (views x images, F) tensor per size group
    projections: torch.Tensor  # the head's output for every view, size groups in order: (all views x images, d)


class SimCLRModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = build_encoder(cfg.arch, cfg.cifar_stem)
        self.feature_dim = feature_dim(self.encoder)
        self.projector = ProjectionHead(self.feature_dim, cfg.proj_hidden_dim or self.feature_dim, cfg.proj_out_dim,
                                        cfg.proj_layers)

    def forward(self, size_groups: list[torch.Tensor]) -> ModelOutput:
        """One encoder pass per size group ``(views x images, 3, s, s)`` (BatchNorm sees all the views
        of a size together, as SwAV's multi-crop), one head pass over every view's features."""
        features = [self.encoder(images) for images in size_groups]
        return ModelOutput(features, self.projector(torch.cat(features) if len(features) > 1 else features[0]))


def head_features(model: SimCLRModel, head_layers: int) -> nn.Module:
    """What evaluation reads features from: the encoder (0), or the encoder followed by the first
    ``head_layers`` layers of the projection head (SimCLRv2 fine-tunes from the head's first layer)."""
    if head_layers == 0:
        return model.encoder
    return nn.Sequential(model.encoder, *list(model.projector)[: 3 * head_layers])


def sync_bn_groups(world_size: int, group_size: int, ranks: str = "") -> list[list[int]]:
    """Rank lists that share batch statistics: one group of everyone, or consecutive blocks of K.
    ``ranks`` says who starts the ranks, for the message (the launchers check before starting them)."""
    if group_size <= 0 or group_size >= world_size:
        return [list(range(world_size))]
    if world_size % group_size:
        divisors = ", ".join(str(k) for k in range(1, world_size + 1) if world_size % k == 0)
        raise ConfigError(f"model.sync_bn_group_size={group_size} does not divide the {world_size} ranks{ranks} "
                          f"into blocks; use one of {divisors} (or 0: all ranks share their batch statistics)")
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def convert_sync_bn(model: nn.Module, world_size: int, group_size: int) -> nn.Module:
    """Replace every BatchNorm by SyncBatchNorm, synchronised within this rank's group of
    ``group_size`` consecutive ranks (0: all of them).

    Every rank must call this (making subgroups is collective)."""
    return convert_sync_batchnorm(model, collectives.subgroup(sync_bn_groups(world_size, group_size)))


def uses_channels_last(cfg: ModelConfig, device: torch.device) -> bool:
    """channels_last pays on CUDA (tensor-core convolutions); on the CPU it only costs copies."""
    return device.type == "cuda" and cfg.channels_last


def build_model(cfg: ModelConfig, device: torch.device, world_size: int = 1) -> nn.Module:
    """The SimCLR model on ``device``: BatchNorm synchronised over ranks when ``cfg.sync_bn`` and
    several ranks or a process group (even of one rank: it runs the all-reduces a big job runs; our
    SyncBatchNorm runs on NCCL and gloo alike);
    channels_last only on CUDA."""
    model = SimCLRModel(cfg)
    if cfg.sync_bn and (world_size > 1 or collectives.active()):
        model = convert_sync_bn(model, world_size, cfg.sync_bn_group_size)
    model = model.to(device)
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under its library's own key names: torchvision's (``conv1.weight``,
    ``layer1...``, so ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` takes them
    and reports only ``fc.*`` missing) or timm's (``timm.create_model(name, num_classes=0)`` loads
    them strictly). SyncBatchNorm buffers map to BatchNorm's names unchanged."""
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
