"""One rank of the scaling benchmark (run under torchrun by ``simclr bench --scaling``): the SimCLR
step with DDP and gathered negatives at a fixed GLOBAL batch split over the world; rank 0 writes
the median step time to argv[1]."""

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.config import DistConfig, ModelConfig, OptimConfig
from trainer.distributed import init_distributed
from trainer.loss import nt_xent
from trainer.model import build_model
from trainer.optim import build_optimizer

out, arch, size, global_batch, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
info = init_distributed(DistConfig(), "auto")
torch.manual_seed(0)
model = build_model(ModelConfig(arch=arch, cifar_stem=size <= 64), info.device, info.world_size, info.rank)
ddp = DistributedDataParallel(model) if info.distributed else model
opt = build_optimizer(model, OptimConfig(name="lars"), lr=0.1)
b = global_batch // info.world_size
images = torch.randn(2 * b, 3, size, size, device=info.device)
times = []
for i in range(2 + iters):
    t = time.perf_counter()
    z1, z2 = ddp(images).chunk(2)
    loss, _ = nt_xent(z1, z2, 0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    if i >= 2:
        times.append(time.perf_counter() - t)
if info.distributed:
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the job moves at its slowest rank
    med = t.item()
else:
    med = statistics.median(times)
if info.rank == 0:
    json.dump({"world": info.world_size, "median_step_s": med}, open(out, "w"))
if info.distributed:
    dist.destroy_process_group()
