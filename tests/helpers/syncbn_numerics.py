"""Under torchrun on a CUDA machine: SyncBatchNorm across 2 ranks (gloo carries the CUDA tensors,
so both ranks may share one GPU) must equal plain BatchNorm over the concatenated batch, in the
forward output, the input gradients, the weight gradients and the running statistics."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", 0)
gen = torch.Generator().manual_seed(0)
x_all = (torch.randn(8 * world, 6, 5, 5, generator=gen) * 3 + 1).to(dev)
w_out = torch.randn(8 * world, 6, 5, 5, generator=gen).to(dev)

ref = nn.BatchNorm2d(6).to(dev)
x_ref = x_all.clone().requires_grad_()
((ref(x_ref) * w_out).sum() / world).backward()  # per-rank losses sum; DDP would average grads

sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(6))).to(dev)
x = x_all[rank * 8 : (rank + 1) * 8].clone().requires_grad_()
out = sync(x)
(out * w_out[rank * 8 : (rank + 1) * 8]).sum().div(world).backward()
wg = sync[0].weight.grad.clone()
dist.all_reduce(wg)  # what DDP's all-reduce of parameter gradients does (sum of per-rank parts)
with torch.no_grad():
    ref_eval_out = (x_all - x_all.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x_all.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
res = {
    "world": world,
    "out_diff": (out - ref_eval_out[rank * 8 : (rank + 1) * 8]).abs().max().item(),
    "xgrad_diff": (x.grad - x_ref.grad[rank * 8 : (rank + 1) * 8]).abs().max().item(),
    "wgrad_diff": (wg - ref.weight.grad).abs().max().item(),
    "running_mean_diff": (sync[0].running_mean - ref.running_mean).abs().max().item(),
    "running_var_diff": (sync[0].running_var - ref.running_var).abs().max().item(),
    "xgrad_scale": x_ref.grad.abs().max().item(),
}
if rank == 0:
    json.dump(res, open(sys.argv[1], "w"))
dist.destroy_process_group()
