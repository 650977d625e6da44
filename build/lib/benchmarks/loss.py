"""The loss at large global batches: ``nt_xent``'s local-rows-by-global-columns form against the naive
full 2N x 2N matrix, as one rank of a world of W ranks would compute it (forward + backward)."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import timed
from trainer.loss import contrastive_loss


def bench_loss(global_batches: list[int], worlds: list[int], iters: int, device: torch.device) -> list[dict]:
    """Per-rank cost at global batch N for a world of W ranks: ours computes 2n x 2N logits
    (n = N/W) with the real ``contrastive_loss`` on gathered columns; the naive version builds the
    full 2N x 2N matrix on every rank."""
    return [time_one_rank(global_batch, world, iters, device) for global_batch in global_batches for world in worlds]


def time_one_rank(global_batch: int, world: int, iters: int, device: torch.device) -> dict:
    n = global_batch // world
    gen = torch.Generator(device=device).manual_seed(0)
    z_all = torch.randn(2 * global_batch, 128, device=device, generator=gen)
    local = torch.cat([z_all[:n], z_all[global_batch : global_batch + n]]).requires_grad_()
    columns = F.normalize(z_all, dim=1)  # what the gather brings: every rank's normalised views
    full_input = z_all.clone().requires_grad_()

    def ours():
        z = F.normalize(local.float(), dim=1)
        loss, _ = contrastive_loss(z[:n], z[n:], columns[:global_batch], columns[global_batch:], 0, 0.1)
        loss.backward()

    def naive():
        nt_xent_full_matrix(full_input[:global_batch], full_input[global_batch:], 0.1).backward()

    t_ours = statistics.median(timed(ours, device, 2, iters))
    t_naive = statistics.median(timed(naive, device, 2, iters))
    return {"global_batch": global_batch, "world": world, "ours_ms": 1e3 * t_ours, "naive_ms": 1e3 * t_naive,
            "speedup": t_naive / t_ours}


def nt_xent_full_matrix(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The naive form: the full 2N x 2N matrix in one process (benchmark baseline, not for training)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)
