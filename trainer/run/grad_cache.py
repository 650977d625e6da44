"""Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the exact contrastive gradient of a large batch with the memory of a micro-batch.

The contrastive loss couples every sample of the global batch, so plain gradient accumulation would change the
loss (each micro-batch would see only its own negatives). Instead:

1. forward every micro-batch (every view of its images) without a graph and keep only its
   projections (views x n x d, small);
2. compute the loss over the whole batch from those projections (gathered across ranks as in the
   plain step) and back-propagate it to the projections only: d loss / d z, cached;
3. forward each micro-batch again with a graph and back-propagate its slice of the cached
   gradient into the parameters (DDP all-reduces once, on the last micro-batch).

The parameter gradient equals the plain step's wherever the network treats samples independently.
BatchNorm does not: its batch statistics are per micro-batch (per micro-batch and across ranks with
SyncBatchNorm), the same in both passes (the same images in the same chunks), so the step is the
exact gradient of the loss of a network whose BatchNorm sees micro-batches. Running statistics are
updated by the second pass only (the first pass restores them), so each image moves them once per
step, as in the plain path.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from trainer.losses import LossFn
from trainer.model.precision import PrecisionPolicy


def model_input(size_groups: list[torch.Tensor], channels_last: bool) -> list[torch.Tensor]:
    """Each size group ``(views, images, 3, s, s)`` as the model takes it, ``(views x images, 3, s, s)``
    (view-major: BatchNorm sees every view of a size together, as in SimCLR)."""
    flat = [g.flatten(0, 1) for g in size_groups]
    return [x.contiguous(memory_format=torch.channels_last) for x in flat] if channels_last else flat


def cached_forward_backward(model: nn.Module, ddp_model: nn.Module, size_groups: list[torch.Tensor],
                            micro_batch: int, loss_fn: LossFn, precision: PrecisionPolicy,
                            channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill the parameters' ``.grad`` with the gradient of ``loss_fn`` over the whole batch, in
    micro-batches of ``micro_batch`` images (every view of each); returns the loss, the accuracy
    and the first view's detached features, as the plain step does.

    ``model`` is the bare model (the first pass needs no DDP hooks), ``ddp_model`` the one that
    synchronises gradients (the model itself when not distributed)."""
    views, images = sum(g.shape[0] for g in size_groups), size_groups[0].shape[1]
    chunks = [slice(start, start + micro_batch) for start in range(0, images, micro_batch)]

    def chunk_input(c: slice) -> list[torch.Tensor]:
        return model_input([g[:, c] for g in size_groups], channels_last)

    # 1. projections without a graph; BatchNorm running statistics restored afterwards
    buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
    saved = [b.clone() for b in buffers]
    with torch.no_grad(), precision.autocast():
        z = torch.cat([model(chunk_input(c)).projections.view(views, c.stop - c.start, -1) for c in chunks], dim=1)
    for buffer, value in zip(buffers, saved):
        buffer.copy_(value)
    z.requires_grad_()

    # 2. the loss over the whole batch, differentiated down to the projections only
    loss, accuracy = loss_fn(z)
    precision.backward(loss)  # under fp16 the cached gradient carries the loss scale, as usual

    # 3. each micro-batch again, with a graph, fed its slice of the cached gradient
    features = []
    for i, c in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync()
        with sync:
            with precision.autocast():
                out = ddp_model(chunk_input(c))
            out.projections.backward(z.grad[:, c].flatten(0, 1).to(out.projections.dtype))
        features.append(out.features[0][: c.stop - c.start].detach())
    return loss, accuracy, torch.cat(features)
