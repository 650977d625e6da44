"""The encoder (a torchvision ResNet or any timm model, random init) and SimCLR's projection head.

``model.arch`` names the encoder: a torchvision ResNet (``resnet50``) or ``timm/<name>`` for any
timm model (``timm/convnext_tiny``, ``timm/vit_small_patch16_224``), built without its classifier so
that it returns pooled features. No weights are downloaded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from trainer.config import ARCHS, ModelConfig
from trainer.dataclass_yaml import ConfigError
from trainer.sync_batchnorm import convert_sync_batchnorm

# the torchvision encoders we build, and the width of their pooled features
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
                "wide_resnet50_2": 2048, "wide_resnet101_2": 2048}


TIMM_PREFIX = "timm/"


class EncoderError(ConfigError):
    """An encoder that cannot be built as configured (an unknown name, a stem that does not apply)."""


def timm_name(arch: str) -> str | None:
    """The timm model name of ``timm/<name>``, None for a torchvision encoder."""
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else None


def check_arch(arch: str, cifar_stem: bool = False) -> None:
    """EncoderError naming the fix when ``arch`` is neither a torchvision ResNet we build nor a timm
    model, or when ``cifar_stem`` is asked of an encoder it does not apply to (timm's own stems)."""
    name = timm_name(arch)
    if name is None:
        if arch not in ARCHS:
            raise EncoderError(f"model.arch={arch!r} is not an encoder we build; choose one of "
                               f"{', '.join(ARCHS)}, or timm/<name> for a timm model (e.g. timm/resnet50d)")
        return
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (close: {', '.join(TIMM_PREFIX + c for c in close)})" if close else ""
        raise EncoderError(f"model.arch={arch!r}: timm {timm.__version__} has no model {name!r}{hint}; "
                           "python -c \"import timm; print(timm.list_models('*convnext*'))\" lists them")
    if cifar_stem:
        raise EncoderError(f"model.cifar_stem=true replaces a torchvision ResNet's stem; {arch} is a timm model with "
                           "its own: set model.cifar_stem=false (for small images pick a timm variant made for them, "
                           "or a torchvision resnet with the CIFAR stem)")


def build_encoder(arch: str, cifar_stem: bool = False) -> nn.Module:
    """The encoder without its classifier, returning pooled features (``num_features`` wide):
    a torchvision ResNet (``fc`` is Identity) or a timm model (``num_classes=0``); never downloads
    weights."""
    check_arch(arch, cifar_stem)
    name = timm_name(arch)
    if name is not None:
        import timm

        try:  # ViTs: position embeddings interpolated to each crop size (multi-crop, resolution schedules)
            return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
        except TypeError:  # a model without the option (CNNs take any size as they are)
            return timm.create_model(name, pretrained=False, num_classes=0)
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:  # small images: keep resolution in the stem, as in the SimCLR paper's CIFAR runs
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.num_features = FEATURE_DIMS[arch]
    return net


def feature_dim(encoder: nn.Module) -> int:
    """The width of the encoder's pooled features (what the probe and the head see)."""
    return int(encoder.num_features)


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
    """The encoder's weights under its library's own key names: torchvision's (``conv1.weight``,
    ``layer1...``, so ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` takes them
    and reports only ``fc.*`` missing) or timm's (``timm.create_model(name, num_classes=0)`` loads
    them strictly). SyncBatchNorm buffers map to BatchNorm's names unchanged."""
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
