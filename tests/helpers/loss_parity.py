"""Under torchrun: the same global batch split over ranks must give the single-process loss and
gradients, for two views (against the two-view loss of before) and for 2 + 6 views (against the
naive full-matrix form). Rank 0 writes the max differences as JSON to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from benchmarks.loss import full_matrix_loss
from tests.helpers.two_view_loss import two_view_nt_xent
from trainer.losses.nt_xent import nt_xent

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
n_global, dim, temperature = 12, 16, 0.2
n = n_global // world
out = {"world": world}
for views in (2, 8):
    z_all = torch.randn(views, n_global, dim, generator=torch.Generator().manual_seed(views)) * 3
    # the reference, single process, whole batch
    ref_in = z_all.clone().requires_grad_()
    ref_loss = two_view_nt_xent(ref_in[0], ref_in[1], temperature, gather=False)[0] if views == 2 else \
        full_matrix_loss(ref_in, temperature)
    ref_loss.backward()
    # this rank's slice, negatives gathered across ranks
    z = z_all[:, rank * n : (rank + 1) * n].clone().requires_grad_()
    loss, _ = nt_xent(z, temperature, gather=True)
    loss.backward()
    # the global loss is the mean over ranks; each rank's gradient is world x d(global)/dz (DDP divides)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    grads = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(grads, z.grad.contiguous() / world)
    out[f"views{views}"] = {"loss_diff": abs(mean_loss.item() - ref_loss.item()),
                            "grad_diff": (torch.cat(grads, dim=1) - ref_in.grad).abs().max().item(),
                            "grad_scale": ref_in.grad.abs().max().item()}
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
