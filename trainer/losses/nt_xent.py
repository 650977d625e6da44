"""NT-Xent (normalised temperature-scaled cross entropy), SimCLR's contrastive loss, for any number
of views: SupCon's per-positive form (Khosla et al. 2020, L_out) with an image's views as its class.

With the V views of each of the N images of the global batch L2-normalised (``z_k``, ``k = 1..VN``),
``P(i)`` the other V - 1 views of the image that view ``i`` came from and ``A(i)`` every view but
``i`` itself, the loss of view ``i`` is

    l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i . z_p / T) / sum_{a in A(i)} exp(z_i . z_a / T) )

and the loss is the mean of ``l_i`` over all VN views. With two views ``|P(i)| = 1`` and this is
SimCLR's NT-Xent exactly. Each rank holds n = N / W images (Vn views): ``contrastive_loss`` scores
only those Vn rows against the VN columns, so memory and compute per rank grow with N, not N^2, and
the mean over ranks of the per-rank losses is the global loss. ``nt_xent`` normalises, gathers the
columns from every rank (with gradients, one collective) and calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from foundation.collectives import gather_with_grad, rank
from trainer.losses.registry import LossConfig, LossFn, register_loss


def contrastive_loss(local: torch.Tensor, columns: torch.Tensor, first_row: int,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of this rank's views against the global batch: a pure function, no communication.

    ``local`` (V, n, d): this rank's views, L2-normalised. ``columns`` (V, N, d): the same views of the
    whole global batch, L2-normalised, images in rank order; this rank's images are images
    ``first_row .. first_row + n - 1``. Returns the mean of ``l_i`` over the Vn local rows (fp32
    logits and log-sum-exp whatever the autocast dtype) and the fraction of rows whose highest score
    is one of their positives (contrastive top-1 accuracy, no gradient).
    """
    views, n, _ = local.shape
    big_n = columns.shape[1]
    with torch.autocast(device_type=local.device.type, enabled=False):
        logits = local.flatten(0, 1).float() @ columns.flatten(0, 1).float().T / temperature  # (Vn, VN)

    # indices built on the device from aranges (no host-to-device copy in the step); columns are
    # view-major like the rows: view w of global image j is column w * N + j
    row = torch.arange(views * n, device=local.device)
    row_view, row_image = row // n, row % n + first_row
    self_cols = row_view * big_n + row_image
    # the other views of each row's image: views v+1 .. v+V-1 (mod V)
    others = (row_view[:, None] + torch.arange(1, views, device=local.device)[None, :]) % views
    pos_cols = others * big_n + row_image[:, None]  # (Vn, V-1)
    is_self = torch.arange(views * big_n, device=local.device)[None, :] == self_cols[:, None]
    logits = logits.masked_fill(is_self, float("-inf"))  # drops the a = i term from the log-sum-exp
    loss = -logits.log_softmax(dim=1).gather(1, pos_cols).mean()
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1)[:, None] == pos_cols).any(dim=1).float().mean()
    return loss, accuracy


def nt_xent(views: torch.Tensor, temperature: float, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and contrastive top-1 accuracy for the projections ``views`` (V, n, d) of this rank.

    ``views[v, i]`` is positive with ``views[w, i]`` for every other view ``w``; every view of every
    other image in the global batch (gathered across ranks, differentiably, when ``gather``) is a
    negative. The gather's backward sums each row's gradient over the ranks whose losses used it.
    """
    if views.ndim != 3 or views.shape[0] < 2:
        raise ValueError(f"expected projections of shape (views >= 2, images, dim), got {tuple(views.shape)}")
    local = F.normalize(views.float(), dim=2)
    if not gather:
        return contrastive_loss(local, local, 0, temperature)
    columns = gather_with_grad(local.transpose(0, 1).contiguous()).transpose(0, 1)  # (V, N, d), one collective
    first_row = rank() * local.shape[1] if columns.shape[1] != local.shape[1] else 0
    return contrastive_loss(local, columns, first_row, temperature)


@register_loss("nt_xent")
def build_nt_xent(cfg: LossConfig) -> LossFn:
    temperature, gather = cfg.temperature, cfg.gather_negatives
    return lambda views: nt_xent(views, temperature, gather)
