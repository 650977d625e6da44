"""What both training backends share: the rank's share of the batch, the epoch and resume
position, the epoch's sample order, and the one corrupt-image policy.

Corrupt images (``data.skip_corrupt``): each sample's own file is checked before the first batch
(every rank checks a slice; findings are shared and cached in the run folder). A corrupt sample
is then read as the next good sample of the dataset, its image **and its label**, so every batch
keeps its size (the gathered loss needs equal batches on every rank). ``corrupt_skipped`` is the
number of distinct corrupt samples found so far: the check finds them all at once, and a file that
passes it but fails to decode later is added when met. Without ``skip_corrupt`` the first corrupt
file ends the run with its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.config import DataConfig
from data_pipeline.file_checks import FileCheckCache
from data_pipeline.sources import DataError, Source


class RankLoader:
    backend: ClassVar[str]  # which backend this loader is ("torchvision", "dali")

    def __init__(self, source: Source, cfg: DataConfig, seed: int, rank: int, world_size: int,
                 device: torch.device, check_cache: Path | None = None) -> None:
        self.source, self.cfg, self.seed = source, cfg, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size = cfg.batch_size // world_size
        self.steps_per_epoch = (len(source) // world_size) // self.batch_size  # the same on every rank
        self.epoch, self.start_step = 0, 0
        self.check_cache = check_cache
        self.corrupt: set[int] = set()  # sample indices found corrupt
        self.replacement: np.ndarray | None = None  # sample -> itself, or the next good sample
        self.files_checked = False

    @property
    def corrupt_skipped(self) -> int:
        return len(self.corrupt)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch (its shuffle) and the step to start from (mid-epoch resume)."""
        self.epoch, self.start_step = epoch, start_step

    def indices(self) -> np.ndarray:
        """This rank's samples of the current epoch from the start step on, in reading order."""
        order = self.source.epoch_order(self.rank, self.world_size, self.seed, self.epoch)
        return order[self.start_step * self.batch_size : self.steps_per_epoch * self.batch_size]

    def check_files(self) -> None:
        """Check each sample's file once per loader (a collective when distributed): every rank
        checks a 1/world slice and the findings are shared; verdicts are kept in ``check_cache``
        (keyed by path, size and mtime), so a restart re-reads no file that has not changed."""
        if self.files_checked:
            return
        self.files_checked = True
        files = self.source.sample_files()
        if not files:
            return
        cache = FileCheckCache(self.check_cache)
        mine, checked = cache.find_corrupt(files[self.rank :: self.world_size],
                                           workers=2 * max(1, self.cfg.num_workers))
        found = [(mine, checked)]
        if dist.is_initialized() and self.world_size > 1:
            found = [None] * self.world_size
            dist.all_gather_object(found, (mine, checked))
        if self.rank == 0:
            cache.save({k: v for _, part in found for k, v in part.items()})
        bad = {p: why for part, _ in found for p, why in part.items()}
        if bad and not self.cfg.skip_corrupt:
            path, why = sorted(bad.items())[0]
            fix = "give this user read access to it" if why.startswith("unreadable") else self.source.damaged_fix
            raise DataError(f"cannot decode image {path}: {why} ({len(bad)} bad file(s) in {self.source.location}); "
                            f"{fix}, or set data.skip_corrupt=true to skip such files")
        self.mark_corrupt([i for i, p in enumerate(files) if p in bad])

    def mark_corrupt(self, indices: list[int]) -> None:
        """Samples found corrupt: from now on each is read as the next good sample of the dataset."""
        new = set(indices) - self.corrupt
        if not new:
            return
        self.corrupt |= new
        bad = np.zeros(len(self.source), dtype=bool)
        bad[list(self.corrupt)] = True
        self.replacement = next_good(bad)

    def replaced(self, indices: np.ndarray) -> np.ndarray:
        """``indices`` with every corrupt sample replaced by the next good one."""
        return indices if self.replacement is None else self.replacement[indices]


def next_good(bad: np.ndarray) -> np.ndarray:
    """For each sample, itself when good, else the next good sample of the dataset (wrapping)."""
    good = np.flatnonzero(~bad)
    if not len(good):
        raise DataError("every image of the dataset is corrupt; check the data path")
    nxt = np.searchsorted(good, np.arange(len(bad)))
    return good[nxt % len(good)]
