"""Encoders by name: a torchvision ResNet (``resnet50``) or ``timm/<name>`` for any timm model
(``timm/convnext_tiny``, ``timm/vit_small_patch16_224``), built without its classifier so that it
returns pooled features. No weights are downloaded. The config checks names here at load."""

from __future__ import annotations

import difflib

from torch import nn

from trainer.runtime.dataclass_yaml import ConfigError

# torchvision ResNets: the SimCLR paper's ResNet-50 (wide_resnet*_2 are its 2x widths), SimCLRv2's deeper ones;
# any other encoder is a timm model, model.arch=timm/<name>
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")

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
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (close: {', '.join(TIMM_PREFIX + c for c in close)})" if close else ""
        raise EncoderError(f"model.arch={arch!r}: timm {timm.__version__} has no model {name!r}{hint}; "
                           f"python -c \"import timm; print(timm.list_models('*{name.split('_')[0]}*'))\" lists them")
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
    import torchvision  # here: importing it costs seconds, and the config checks names without it

    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:  # small images: keep resolution in the stem, as in the SimCLR paper's CIFAR runs
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.num_features = net.fc.in_features  # the pooled features' width, as timm models say it
    net.fc = nn.Identity()
    return net


def _patch_rule(encoder: nn.Module) -> str | None:
    """What a timm patch embedding asks of its input sizes, in words (None: no patch embedding)."""
    for module in encoder.modules():
        if hasattr(module, "patch_size") and hasattr(module, "img_size") and hasattr(module, "strict_img_size"):
            patch, img = module.patch_size[0], module.img_size
            if module.strict_img_size and img is not None:
                return (f"only {img[0]} px (a fixed input size); set every view to {img[0]} px, or choose a model "
                        "that takes any size (a CNN, or a ViT: ours are built with dynamic image sizes)")
            if not getattr(module, "dynamic_img_pad", False):
                return f"sizes that are multiples of {patch} px (its patch)"
    return None


def check_input_sizes(arch: str, cifar_stem: bool, uses: list[tuple[str, int | None, int]]) -> None:
    """EncoderError when ``arch`` cannot take a size the run will use. ``uses``: (the view group's
    key, epoch, size) of every view group over every epoch. The encoder is built on the meta device
    (no memory, no compute) and shown each distinct size once; what refuses is named with the sizes
    the model takes. For timm models only (torchvision ResNets take any size we train at)."""
    if timm_name(arch) is None or not uses:
        return
    import torch

    with torch.device("meta"):
        encoder = build_encoder(arch, cifar_stem)
    for size in sorted({size for _, _, size in uses}):
        try:
            encoder(torch.empty(2, 3, size, size, device="meta"))
        except NotImplementedError:  # an operator without a meta kernel: the first step will tell
            return
        except (AssertionError, RuntimeError, ValueError) as exc:
            key, epoch = next((key, epoch) for key, epoch, s in uses if s == size)
            rule = _patch_rule(encoder) or f"not {size} px ({str(exc).splitlines()[0][:200]})"
            when = "" if epoch is None else f" at epoch {epoch}"
            raise EncoderError(f"{key} is {size} px{when}, which {arch} cannot take: it takes {rule}") from None


def feature_dim(encoder: nn.Module) -> int:
    """The width of the encoder's pooled features (what the probe and the head see)."""
    return int(encoder.num_features)
