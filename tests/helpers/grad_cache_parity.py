"""Under torchrun: one training step on this rank's share of a fixed global batch, plain or with
gradient caching (``train.micro_batch`` in the overrides), with BatchNorm in eval mode so that the
network treats samples independently. Rank 0 writes the loss and the (DDP-averaged) parameter
gradients to argv[1]."""

import gc
import sys

import torch

from tests.helpers.grad_cache_batch import global_views
from trainer.config import load_config
from trainer.run.parts import build_parts
from trainer.run.step import train_step
from trainer.runtime.distributed import init_distributed, teardown

out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, overrides)
info = init_distributed(cfg.dist, "cpu")
parts = build_parts(cfg, info)
parts.model.eval()
groups = global_views(cfg.data.batch_size, cfg.data.image_size)
n = cfg.data.batch_size // info.world_size
mine = slice(info.rank * n, (info.rank + 1) * n)
outcome = train_step(parts, [g[:, mine] for g in groups], lr=0.0)
loss = outcome.loss.clone()
if info.distributed:
    torch.distributed.all_reduce(loss)
    loss /= info.world_size
if info.is_main:
    torch.save({"loss": loss, "grads": {k: p.grad.clone() for k, p in parts.model.named_parameters()}}, out)
if info.distributed:
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
# the DDP model holds the group's worker threads: freed while the interpreter is whole, not in its
# finalisation, where gloo's threads destroying tensors abort the process (SIGABRT, "terminate called
# without an active exception": once in five runs of this rank at exit; pytorch PR 179291)
del parts
gc.collect()
teardown()
