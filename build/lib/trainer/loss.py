"""NT-Xent (normalised temperature-scaled cross entropy), SimCLR's contrastive loss.

With the 2N views of the global batch L2-normalised (``z_k``, ``k = 1..2N``) and ``p(i)`` the other
view of the image that view ``i`` came from, the loss of view ``i`` is

    l_i = -log( exp(z_i . z_p(i) / T) / sum_{k != i} exp(z_i . z_k / T) )

and NT-Xent is the mean of ``l_i`` over all views. Each rank holds n = N / W images (2n views):
``contrastive_loss`` scores only those 2n rows against the 2N columns, so memory and compute per
rank grow with N, not N^2, and the mean over ranks of the per-rank losses is the global loss.
``nt_xent`` normalises, gathers the columns from every rank (with gradients) and calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.distributed import gather_with_grad, rank


def contrastive_loss(local1: torch.Tensor, local2: torch.Tensor, columns1: torch.Tensor, columns2: torch.Tensor,
                     first_row: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of this rank's views against the global batch: a pure function, no communication.

    ``local1, local2`` (n, d): this rank's two views, L2-normalised. ``columns1, columns2`` (N, d):
    the same views of the whole global batch, L2-normalised, in rank order; this rank's images sit
    at rows ``first_row .. first_row + n - 1`` of each. Returns the mean of ``l_i`` over the 2n local
    rows (fp32 logits and log-sum-exp whatever the autocast dtype) and the fraction of those rows
    whose positive scores highest (contrastive top-1 accuracy, no gradient).
    """
    n, big_n = local1.shape[0], columns1.shape[0]
    rows = torch.cat([local1, local2])  # (2n, d)
    columns = torch.cat([columns1, columns2])  # (2N, d)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        logits = rows.float() @ columns.float().T / temperature  # (2n, 2N)

    idx = torch.arange(n, device=rows.device) + first_row
    self_cols = torch.cat([idx, idx + big_n])  # where each row meets itself
    pos_cols = torch.cat([idx + big_n, idx])  # where each row meets its other view
    # a mask built on the device and a Python fill value: no host-to-device copy in the step
    is_self = torch.arange(2 * big_n, device=rows.device)[None, :] == self_cols[:, None]
    logits = logits.masked_fill(is_self, float("-inf"))
    loss = F.cross_entropy(logits, pos_cols)  # log-sum-exp is stable; -inf drops the k = i term
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == pos_cols).float().mean()
    return loss, accuracy


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and contrastive top-1 accuracy for two views ``z1, z2`` of shape (n, d) on this rank.

    Row i of ``z1`` is positive with row i of ``z2``; every other view in the global batch
    (gathered across ranks, differentiably, when ``gather``) is a negative. The gather's backward
    sums each row's gradient over the ranks whose losses used it.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    if not gather:
        return contrastive_loss(z1, z2, z1, z2, 0, temperature)
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    first_row = rank() * z1.shape[0] if g1.shape[0] != z1.shape[0] else 0
    return contrastive_loss(z1, z2, g1, g2, first_row, temperature)
