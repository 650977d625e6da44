"""NT-Xent (normalised temperature-scaled cross entropy), SimCLR's contrastive loss.

Each rank scores only its own 2n rows against the 2N columns of the global batch, so memory and
compute per rank grow with N, not N^2; the logits are fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.distributed import gather_with_grad, rank


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and contrastive top-1 accuracy for two views ``z1, z2`` of shape (n, d) on this rank.

    Row i of ``z1`` is positive with row i of ``z2``; every other view in the global batch
    (gathered across ranks when ``gather``) is a negative. Returns the mean loss over this rank's
    2n rows and the fraction of those rows whose positive scores highest.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    if gather:
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        offset = rank() * n if g1.shape[0] != n else 0
    else:
        g1, g2, offset = z1, z2, 0
    big_n = g1.shape[0]
    local = torch.cat([z1, z2])  # (2n, d)
    columns = torch.cat([g1, g2])  # (2N, d)
    with torch.autocast(device_type=local.device.type, enabled=False):
        logits = local @ columns.T / temperature  # (2n, 2N), fp32

    idx = torch.arange(n, device=local.device) + offset
    self_cols = torch.cat([idx, idx + big_n])  # where each row meets itself
    pos_cols = torch.cat([idx + big_n, idx])  # where each row meets its other view
    rows = torch.arange(2 * n, device=local.device)
    logits = logits.index_put((rows, self_cols), torch.tensor(float("-inf"), device=local.device))
    loss = F.cross_entropy(logits, pos_cols)  # log-sum-exp is stable; -inf drops the self term
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == pos_cols).float().mean()
    return loss, accuracy


def nt_xent_full_matrix(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The naive form: the full 2N x 2N matrix in one process (benchmark baseline, not for training)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)
