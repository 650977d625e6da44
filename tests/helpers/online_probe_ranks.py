"""Under torchrun (2 gloo ranks): train one epoch, then check the probe is the same on both ranks and
that the validation (and the kNN monitor) split over ranks equals one process doing everything.
Rank 0 writes argv[1]."""

import gc
import json
import sys

import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.evaluation.evaluate import knn_monitor, probe_val_top1
from trainer.run.loop import run_training
from trainer.run.parts import build_parts
from trainer.runtime.distributed import init_distributed, teardown

out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, overrides)
info = init_distributed(cfg.dist, "cpu")
parts = build_parts(cfg, info)
import threading  # noqa: E402

run_training(parts, threading.Event())
weights = torch.cat([p.detach().reshape(-1) for p in parts.online_probe.classifier.parameters()])
gathered = [torch.zeros_like(weights) for _ in range(info.world_size)]
dist.all_gather(gathered, weights)
split = probe_val_top1(parts.model.encoder, parts.online_probe, parts.val_source, cfg.data, info.device, info.rank,
                       info.world_size)
splits = [None] * info.world_size
dist.all_gather_object(splits, split)
knn_split = knn_monitor(parts.model.encoder, parts.loader.source, parts.val_source, cfg.data, info.device,
                        shard=(info.rank, info.world_size))
knn_splits = [None] * info.world_size
dist.all_gather_object(knn_splits, knn_split)
if info.is_main:
    alone = probe_val_top1(parts.model.encoder, parts.online_probe, parts.val_source, cfg.data, info.device, 0, 1)
    knn_alone = knn_monitor(parts.model.encoder, parts.loader.source, parts.val_source, cfg.data, info.device)
    json.dump({"weights_equal_on_both_ranks": all(torch.equal(gathered[0], g) for g in gathered),
               "val_top1_equal_on_both_ranks": len(set(splits)) == 1, "val_top1": split,
               "single_process_val_top1": alone, "knn_equal_on_both_ranks": len(set(knn_splits)) == 1,
               "knn_top1": knn_split, "single_process_knn_top1": knn_alone}, open(out, "w"))
dist.barrier()
# the DDP model holds the group's worker threads: freed while the interpreter is whole, not in its
# finalisation, where gloo's threads destroying tensors abort the process (SIGABRT, "terminate called
# without an active exception": once in five runs of this rank at exit; pytorch PR 179291)
del parts
gc.collect()
teardown()
