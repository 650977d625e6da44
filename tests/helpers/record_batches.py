"""Under torchrun (any number of ranks): train with ``python -m trainer``'s arguments, recording on
every rank which samples each global step used and a checksum of each sample's two views, appended
to ``<argv[1]>/rank<R>.jsonl`` (so a resumed run adds to what the first part recorded). The dataset
is an .npz whose labels are the sample indices."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

import trainer.run.parts
from trainer.config import load_config
from trainer.run.loop import train

out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
real_build_loader = trainer.run.parts.build_loader


class RecordingLoader:
    def __init__(self, loader) -> None:
        self.loader, self.source, self.backend, self.first_step = loader, loader.source, loader.backend, 0
        self.steps_per_epoch, self.corrupt_skipped, self.views = loader.steps_per_epoch, 0, loader.views
        self.store_retries = 0
        self.rebuilds = loader.rebuilds
        self.check_files, self.close = loader.check_files, loader.close

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.first_step = epoch * self.steps_per_epoch + start_step
        self.loader.set_epoch(epoch, start_step)

    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        for i, (groups, labels) in enumerate(self.loader):
            sums = (groups[0][0].sum((1, 2, 3)) + 2 * groups[0][1].sum((1, 2, 3))).tolist()
            row = {"step": self.first_step + i, "samples": labels.tolist(), "view_sums": [round(v, 3) for v in sums]}
            with open(out_dir / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            yield groups, labels


trainer.run.parts.build_loader = lambda *args, **kwargs: RecordingLoader(real_build_loader(*args, **kwargs))
out_dir.mkdir(parents=True, exist_ok=True)
train(load_config(None, overrides))
