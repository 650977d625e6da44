"""The two-view NT-Xent as it was before views became a specification (``nt_xent(z1, z2)``), kept
as the reference the multi-view loss must reproduce for two views (loss and gradients)."""

import torch
import torch.nn.functional as F

from foundation.collectives import gather_with_grad, rank


def two_view_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                     gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    c1, c2 = (gather_with_grad(z1), gather_with_grad(z2)) if gather else (z1, z2)
    first_row = rank() * z1.shape[0] if c1.shape[0] != z1.shape[0] else 0
    n, big_n = z1.shape[0], c1.shape[0]
    logits = torch.cat([z1, z2]) @ torch.cat([c1, c2]).T / temperature
    idx = torch.arange(n) + first_row
    self_cols, pos_cols = torch.cat([idx, idx + big_n]), torch.cat([idx + big_n, idx])
    logits = logits.masked_fill(torch.arange(2 * big_n)[None, :] == self_cols[:, None], float("-inf"))
    loss = F.cross_entropy(logits, pos_cols)
    return loss, (logits.argmax(dim=1) == pos_cols).float().mean()
