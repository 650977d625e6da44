"""Under torchrun (gloo): our SyncBatchNorm across the ranks must equal plain BatchNorm over the
concatenated batch, in the forward output, the input gradients, the weight and bias gradients
and the running statistics (after two training steps). In blocks of one rank (the group each
rank takes from ``collectives.subgroup``, as ``model.sync_bn_group_size=1`` makes), it must equal
plain BatchNorm over the rank's own batch. argv: OUT DEVICE (cpu, or cuda: both ranks may share one
GPU, gloo carries the CUDA tensors)."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from foundation import collectives
from trainer.model.simclr import sync_bn_groups
from trainer.model.sync_batchnorm import convert_sync_batchnorm

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device(sys.argv[2])
gen = torch.Generator().manual_seed(0)
n = 8
ref = nn.Sequential(nn.BatchNorm2d(6), nn.BatchNorm1d(5)).double()  # the 1d one is fed (N, C) below
with torch.no_grad():
    ref[0].weight.copy_(torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
    ref[0].bias.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(6), nn.BatchNorm1d(5)))
sync.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
sync, ref = sync.to(dev), ref.to(dev)
res = {"world": world, "converted": type(sync[0]).__name__}
for step in range(2):
    x_all = (torch.randn(n * world, 6, 5, 5, generator=gen, dtype=torch.float64) * 3 + 1).to(dev)
    w_out = torch.randn(n * world, 6, 5, 5, generator=gen, dtype=torch.float64).to(dev)
    f_all = (torch.randn(n * world, 5, generator=gen, dtype=torch.float64) * 2 - 1).to(dev)
    x_ref, f_ref = x_all.clone().requires_grad_(), f_all.clone().requires_grad_()
    ref.zero_grad()
    ref_out = ref[0](x_ref)
    ((ref_out * w_out).sum() + ref[1](f_ref).pow(2).sum()).div(world).backward()  # DDP averages
    mine = slice(rank * n, (rank + 1) * n)
    x, f = x_all[mine].float().clone().requires_grad_(), f_all[mine].float().clone().requires_grad_()
    sync.zero_grad()
    out, out1d = sync[0](x), sync[1](f)
    ((out * w_out[mine].float()).sum() + out1d.pow(2).sum()).div(world).backward()
    grads = torch.cat([sync[0].weight.grad, sync[0].bias.grad, sync[1].weight.grad, sync[1].bias.grad])
    dist.all_reduce(grads)  # what DDP's all-reduce of parameter gradients does (sum of per-rank parts)
    ref_grads = torch.cat([ref[0].weight.grad, ref[0].bias.grad, ref[1].weight.grad, ref[1].bias.grad])
    res[f"step{step}"] = {
        "out_diff": (out.double() - ref_out[mine]).abs().max().item(),
        "xgrad_diff": (x.grad.double() - x_ref.grad[mine]).abs().max().item(),
        "fgrad_diff": (f.grad.double() - f_ref.grad[mine]).abs().max().item(),
        "param_grad_diff": (grads.double() - ref_grads).abs().max().item(),
        "xgrad_scale": x_ref.grad.abs().max().item(),
    }
res["running_mean_diff"] = (sync[0].running_mean.double() - ref[0].running_mean).abs().max().item()
res["running_var_diff"] = (sync[0].running_var.double() - ref[0].running_var).abs().max().item()
res["running_1d_diff"] = max((sync[1].running_mean.double() - ref[1].running_mean).abs().max().item(),
                             (sync[1].running_var.double() - ref[1].running_var).abs().max().item())

own = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(6)), collectives.subgroup(sync_bn_groups(world, 1)))
plain = nn.BatchNorm2d(6).double()
own, plain = own.to(dev), plain.to(dev)
x_all = (torch.randn(n * world, 6, 5, 5, generator=gen, dtype=torch.float64) * 3 + 1).to(dev)
x_own = x_all[rank * n : (rank + 1) * n]  # each rank its own rows: the other rank's must not count
x, x_ref = x_own.float().clone().requires_grad_(), x_own.clone().requires_grad_()
own(x).pow(2).sum().backward()
plain(x_ref).pow(2).sum().backward()
res["own_group"] = {"out_diff": (own(x).double() - plain(x_ref)).abs().max().item(),
                    "xgrad_diff": (x.grad.double() - x_ref.grad).abs().max().item(),
                    "running_var_diff": (own[0].running_var.double() - plain.running_var).abs().max().item()}
if rank == 0:
    json.dump(res, open(sys.argv[1], "w"))
dist.destroy_process_group()
