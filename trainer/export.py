"""The trained encoder as users take it away: an MLflow PyTorch model that is a plain torchvision
ResNet (SyncBatchNorm turned back into BatchNorm, on the CPU, in fp32), logged by the training run
or, when MLflow was unreachable then, by ``simclr sync`` later."""

from __future__ import annotations

from torch import nn

from trainer.sync_batchnorm import revert_sync_batchnorm
from trainer.tracking import Tracker


def log_encoder_model(tracker: Tracker, encoder: nn.Module, image_size: int, register_as: str = "") -> str | None:
    """Log ``encoder`` (no projection head) as an MLflow model taking normalised NCHW float32 images
    of any size and returning features; registered as ``register_as`` when given. Returns its URI."""
    import numpy as np

    plain = revert_sync_batchnorm(encoder).cpu().float().eval()
    size = min(image_size, 64)  # the example is stored as JSON: keep it small
    example = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    uri = tracker.log_model(plain, example, register_as)
    if uri:
        registered = f", registered as {register_as}" if register_as else ""
        print(f"[simclr] encoder logged as an MLflow model: mlflow.pytorch.load_model('{uri}'){registered}", flush=True)
    return uri
