"""Under torchrun: each rank reads two epochs from the DALI pipeline (CPU mode) over an npz whose
labels are the sample indices, twice with the same seed, and writes what it saw to argv[1]."""

import json
import sys

import torch

from data_pipeline import build_loader
from data_pipeline.config import DataConfig
from trainer.config import DistConfig
from trainer.runtime.distributed import init_distributed, teardown

info = init_distributed(DistConfig(), "cpu")  # the trainer's way in (DALI imports torch._dynamo after it)
rank, world = info.rank, info.world_size
cfg = DataConfig(root=sys.argv[2], backend="dali", image_size=16, batch_size=8, num_workers=1)
seen = {}
for attempt in ("a", "b"):
    loader = build_loader(cfg, seed=7, rank=rank, world_size=world, device=torch.device("cpu"))
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen[f"{attempt}{epoch}"] = [y for _, labels in loader for y in labels.tolist()]
seen["steps"] = loader.steps_per_epoch
json.dump(seen, open(f"{sys.argv[1]}.{rank}", "w"))
teardown()
