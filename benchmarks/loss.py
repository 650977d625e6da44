"""The loss at large global batches: ``nt_xent``'s local-rows-by-global-columns form against the naive
full VN x VN matrix (V views of N images), as one rank of a world of W ranks would compute it
(forward + backward)."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import timed
from trainer.losses.nt_xent import contrastive_loss


def bench_loss(global_batches: list[int], worlds: list[int], iters: int, device: torch.device,
               views: int = 2) -> list[dict]:
    """Per-rank cost at global batch N for a world of W ranks: ours computes Vn x VN logits
    (n = N/W) with the real ``contrastive_loss`` on gathered columns; the naive version builds the
    full VN x VN matrix on every rank."""
    return [time_one_rank(global_batch, world, iters, device, views)
            for global_batch in global_batches for world in worlds]


def time_one_rank(global_batch: int, world: int, iters: int, device: torch.device, views: int = 2) -> dict:
    n = global_batch // world
    gen = torch.Generator(device=device).manual_seed(0)
    z_all = torch.randn(views, global_batch, 128, device=device, generator=gen)
    local = z_all[:, :n].clone().requires_grad_()
    columns = F.normalize(z_all, dim=2)  # what the gather brings: every rank's normalised views
    full_input = z_all.clone().requires_grad_()

    def ours():
        loss, _ = contrastive_loss(F.normalize(local.float(), dim=2), columns, 0, 0.1)
        loss.backward()

    def naive():
        full_matrix_loss(full_input, 0.1).backward()

    t_ours = statistics.median(timed(ours, device, 2, iters))
    t_naive = statistics.median(timed(naive, device, 2, iters))
    return {"global_batch": global_batch, "world": world, "views": views, "ours_ms": 1e3 * t_ours,
            "naive_ms": 1e3 * t_naive, "speedup": t_naive / t_ours}


def full_matrix_loss(views: torch.Tensor, temperature: float) -> torch.Tensor:
    """The naive form for ``views`` (V, N, d): the full VN x VN matrix in one process, positives
    found by comparing image indices (benchmark baseline and test reference, not for training)."""
    n_views, n = views.shape[:2]
    z = F.normalize(views.float(), dim=2).flatten(0, 1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    image = torch.arange(n, device=z.device).repeat(n_views)
    positive = (image[:, None] == image[None, :]) & ~torch.eye(n_views * n, dtype=torch.bool, device=z.device)
    log_prob = sim.log_softmax(dim=1)
    return -(log_prob.masked_fill(~positive, 0).sum(dim=1) / (n_views - 1)).mean()
