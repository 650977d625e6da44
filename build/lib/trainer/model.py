"""The encoder (a torchvision ResNet, random init) and SimCLR's projection head."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from trainer.config import ModelConfig
from trainer.sync_batchnorm import convert_sync_batchnorm

# the width of each encoder's pooled features (what the probe and the head see)
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
                "wide_resnet50_2": 2048, "wide_resnet101_2": 2048}


def build_encoder(arch: str, cifar_stem: bool = False) -> nn.Module:
    """A torchvision ResNet without its classifier (``fc`` is Identity); never downloads weights."""
    if arch not in FEATURE_DIMS:
        raise ValueError(f"unknown encoder {arch!r}; choose one of {', '.join(FEATURE_DIMS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:  # small images: keep resolution in the stem, as in the SimCLR paper's CIFAR runs
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


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


class SimCLRModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.feature_dim = FEATURE_DIMS[cfg.arch]
        self.encoder = build_encoder(cfg.arch, cfg.cifar_stem)
        self.projector = ProjectionHead(self.feature_dim, cfg.proj_hidden_dim or self.feature_dim, cfg.proj_out_dim,
                                        cfg.proj_layers)

        self.probe_features: list[torch.Tensor] | None = None  # set by the step when an online probe reads them

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        if self.probe_features is not None and torch.is_grad_enabled():  # the pass that trains (not grad
            self.probe_features.append(features[: features.shape[0] // 2].detach())  # caching's first one): view 1
        return self.projector(features)


def head_features(model: SimCLRModel, head_layers: int) -> nn.Module:
    """What evaluation reads features from: the encoder (0), or the encoder followed by the first
    ``head_layers`` layers of the projection head (SimCLRv2 fine-tunes from the head's first layer)."""
    if head_layers == 0:
        return model.encoder
    return nn.Sequential(model.encoder, *list(model.projector)[: 3 * head_layers])


def sync_bn_groups(world_size: int, group_size: int) -> list[list[int]]:
    """Rank lists that share batch statistics: one group of everyone, or consecutive blocks of K."""
    if group_size <= 0 or group_size >= world_size:
        return [list(range(world_size))]
    if world_size % group_size:
        raise ValueError(f"model.sync_bn_group_size={group_size} must divide the world size {world_size}")
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def convert_sync_bn(model: nn.Module, world_size: int, rank: int, group_size: int) -> nn.Module:
    """Replace every BatchNorm by SyncBatchNorm, synchronised within this rank's group.

    Every rank must call this (creating subgroups is collective)."""
    groups = sync_bn_groups(world_size, group_size)
    process_group = None
    if len(groups) > 1:
        for ranks in groups:  # every rank creates every group, in the same order
            handle = dist.new_group(ranks)
            if rank in ranks:
                process_group = handle
    return convert_sync_batchnorm(model, process_group)


def uses_channels_last(cfg: ModelConfig, device: torch.device) -> bool:
    """channels_last pays on CUDA (tensor-core convolutions); on the CPU it only costs copies."""
    return device.type == "cuda" and cfg.channels_last


def build_model(cfg: ModelConfig, device: torch.device, world_size: int = 1, rank: int = 0) -> nn.Module:
    """The SimCLR model on ``device``: BatchNorm synchronised over ranks when ``cfg.sync_bn`` and
    more than one rank (our SyncBatchNorm runs on NCCL and gloo alike); channels_last only on CUDA."""
    model = SimCLRModel(cfg)
    if cfg.sync_bn and world_size > 1:
        model = convert_sync_bn(model, world_size, rank, cfg.sync_bn_group_size)
    model = model.to(device)
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under torchvision's own key names (``conv1.weight``, ``layer1...``),
    so ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` takes them and reports
    only ``fc.*`` missing. SyncBatchNorm buffers map to BatchNorm's names unchanged."""
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
