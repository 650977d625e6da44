"""Contrastive losses, chosen by name (``loss.name``; ``trainer.losses.registry``). A new loss is
one module here that registers its builder, and its import below."""

from trainer.losses import nt_xent as _nt_xent  # noqa: F401  (registers nt_xent)
from trainer.losses.registry import LOSSES, LossConfig, LossFn, build_loss, register_loss

__all__ = ["LOSSES", "LossConfig", "LossFn", "build_loss", "register_loss"]
