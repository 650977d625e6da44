"""Under torchrun (2 gloo ranks): the DALI loader with ``data.on_device`` and the host-fed one on
the same .npz (labels are the sample indices), two epochs each; every rank writes, per batch, the
sample ids both loaders gave and the ids its share of the epoch order holds, to argv[2].rank<R>."""

import json
import sys

import torch

from data_pipeline import build_loader
from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.sampling import rank_indices
from trainer.config import DistConfig
from trainer.runtime.distributed import init_distributed, teardown

data, out = sys.argv[1], sys.argv[2]
info = init_distributed(DistConfig(), "cpu")
fixed = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                      grayscale_prob=0.0, blur_prob=0.0)
cfg = DataConfig(root=data, backend="dali", image_size=16, batch_size=16, num_workers=1, augment=fixed)
device = torch.device("cpu")
host = build_loader(cfg, 3, info.rank, info.world_size, device)
kept = build_loader(DataConfig(**{**cfg.__dict__, "on_device": True}), 3, info.rank, info.world_size, device)
rows = []
for epoch in (0, 1):
    host.set_epoch(epoch)
    kept.set_epoch(epoch)
    expected = rank_indices(len(host.source), info.rank, info.world_size, 3, epoch)
    for step, (((h1,), hy), ((k1,), ky)) in enumerate(zip(host, kept, strict=True)):
        rows.append({"epoch": epoch, "host": hy.tolist(), "on_device": ky.tolist(),
                     "order": expected[step * host.batch_size : (step + 1) * host.batch_size].tolist(),
                     "views_equal": bool(torch.equal(h1, k1))})
with open(f"{out}.rank{info.rank}", "w") as f:
    json.dump({"rows": rows, "pipelines_built": kept.pipelines_built}, f)
teardown()
