"""Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the exact contrastive gradient of a large batch with the memory of a micro-batch.

NT-Xent couples every sample of the global batch, so plain gradient accumulation would change the
loss (each micro-batch would see only its own negatives). Instead:

1. forward every micro-batch without a graph and keep only its projections (n x d, small);
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

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from trainer.precision import PrecisionPolicy

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def two_view_images(view1: torch.Tensor, view2: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """One forward for both views (BatchNorm sees both, as in SimCLR): the first half of the
    output is view 1, the second half view 2."""
    images = torch.cat([view1, view2])
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def cached_forward_backward(model: nn.Module, ddp_model: nn.Module, view1: torch.Tensor, view2: torch.Tensor,
                            micro_batch: int, loss_fn: LossFn, precision: PrecisionPolicy,
                            channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the parameters' ``.grad`` with the gradient of ``loss_fn`` over the whole batch, in
    micro-batches of ``micro_batch`` images; returns the loss and accuracy as the plain step does.

    ``model`` is the bare model (the first pass needs no DDP hooks), ``ddp_model`` the one that
    synchronises gradients (the model itself when not distributed)."""
    chunks = [slice(start, start + micro_batch) for start in range(0, view1.shape[0], micro_batch)]

    # 1. projections without a graph; BatchNorm running statistics restored afterwards
    buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
    saved = [b.clone() for b in buffers]
    with torch.no_grad(), precision.autocast():
        outputs = [model(two_view_images(view1[c], view2[c], channels_last)) for c in chunks]
    for buffer, value in zip(buffers, saved):
        buffer.copy_(value)
    z1 = torch.cat([out[: out.shape[0] // 2] for out in outputs]).requires_grad_()
    z2 = torch.cat([out[out.shape[0] // 2 :] for out in outputs]).requires_grad_()
    del outputs

    # 2. the loss over the whole batch, differentiated down to the projections only
    loss, accuracy = loss_fn(z1, z2)
    precision.backward(loss)  # under fp16 the cached gradient carries the loss scale, as usual

    # 3. each micro-batch again, with a graph, fed its slice of the cached gradient
    for i, c in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync()
        with sync:
            with precision.autocast():
                out = ddp_model(two_view_images(view1[c], view2[c], channels_last))
            out.backward(torch.cat([z1.grad[c], z2.grad[c]]).to(out.dtype))
    return loss, accuracy
