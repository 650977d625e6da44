"""Under torchrun: the same global batch split over ranks must give the single-process loss and
gradients. Rank 0 writes the max differences as JSON to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from trainer.loss import nt_xent

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
gen = torch.Generator().manual_seed(0)
n_global, dim, temperature = 12, 16, 0.2
z1_all = torch.randn(n_global, dim, generator=gen) * 3
z2_all = torch.randn(n_global, dim, generator=gen) * 3

# single process, whole batch
a, b = z1_all.clone().requires_grad_(), z2_all.clone().requires_grad_()
dist_free_loss, _ = nt_xent(a, b, temperature, gather=False)
dist_free_loss.backward()

# this rank's slice, negatives gathered across ranks
n = n_global // world
z1 = z1_all[rank * n : (rank + 1) * n].clone().requires_grad_()
z2 = z2_all[rank * n : (rank + 1) * n].clone().requires_grad_()
loss, acc = nt_xent(z1, z2, temperature, gather=True)
loss.backward()
# The global loss is the mean over ranks; each rank's gradient is world x d(global)/dz (DDP divides).
mean_loss = loss.detach().clone()
dist.all_reduce(mean_loss)
mean_loss /= world
g1 = [torch.empty_like(z1) for _ in range(world)]
g2 = [torch.empty_like(z2) for _ in range(world)]
dist.all_gather(g1, z1.grad / world)
dist.all_gather(g2, z2.grad / world)
if rank == 0:
    out = {
        "loss_diff": abs(mean_loss.item() - dist_free_loss.item()),
        "grad1_diff": (torch.cat(g1) - a.grad).abs().max().item(),
        "grad2_diff": (torch.cat(g2) - b.grad).abs().max().item(),
        "grad_scale": a.grad.abs().max().item(),
        "world": world,
    }
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
