"""What both training backends share: the rank's share of the batch, the epoch and resume
position, the epoch's sample order, and the one corrupt-image policy.

Corrupt images (``data.skip_corrupt``): each sample's own file is checked before the first batch
(every rank checks a slice; findings are shared and kept with the tree index in the run folder). A corrupt sample
is then read as the next good sample of the dataset, its image **and its label**, so every batch
keeps its size (the gathered loss needs equal batches on every rank). ``corrupt_skipped`` is the
number of distinct corrupt samples found so far: the check finds them all at once, and a file that
passes it but fails to decode later is added when met. Without ``skip_corrupt`` the first corrupt
file ends the run with its name.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.file_checks import find_corrupt_images
from data_pipeline.sources import SKIP_CORRUPT_HINT, DataError, Source, bad_files_line
from data_pipeline.views import view_spec
from foundation.collectives import gather_objects


class RankLoader:
    backend: ClassVar[str]  # which backend this loader is ("torchvision", "dali")

    def __init__(self, source: Source, cfg: DataConfig, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.source, self.cfg, self.seed = source, cfg, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.views = view_spec(cfg)
        self.batch_size = cfg.batch_size // world_size
        self.steps_per_epoch = (len(source) // world_size) // self.batch_size  # the same on every rank
        self.epoch, self.start_step = 0, 0
        self.corrupt: set[int] = set()  # sample indices found corrupt
        self.replacement: np.ndarray | None = None  # sample -> itself, or the next good sample
        self.files_checked = False
        self.rebuilds: list[tuple[int, float]] = []  # (epoch, seconds) of pipelines rebuilt for a new crop size

    @property
    def corrupt_skipped(self) -> int:
        return len(self.corrupt) + self.source.left_out

    @property
    def store_retries(self) -> int:
        return self.source.store_retries

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch (its shuffle) and the step to start from (mid-epoch resume)."""
        self.epoch, self.start_step = epoch, start_step

    def close(self) -> None:
        """Release what the loader holds (a backend's pipeline, threads, buffers); iterating again
        starts afresh. Nothing to release by default."""

    def indices(self) -> np.ndarray:
        """This rank's samples of the current epoch from the start step on, in reading order."""
        order = self.source.epoch_order(self.rank, self.world_size, self.seed, self.epoch)
        return order[self.start_step * self.batch_size : self.steps_per_epoch * self.batch_size]

    def check_files(self) -> None:
        """Check each sample's file once per loader (a collective when distributed): every rank
        checks a 1/world slice of the files not yet checked and the findings are shared; the
        verdicts are kept with the source's listing (its tree index in the run folder), so a restart
        re-reads only the files of folders that changed."""
        if self.files_checked:
            return
        self.files_checked = True
        checks = self.source.file_checks()
        if checks is None:
            return
        known, pending = checks.known_bad(), checks.pending()
        mine = pending[self.rank :: self.world_size]
        names = {self.source.sample_name(i): i for i in mine}
        found = find_corrupt_images(list(names), workers=2 * max(1, self.cfg.num_workers))
        new_bad = gather_objects({names[str(p)]: why for p, why in found.items()})
        fresh = {i: why for part in new_bad for i, why in part.items()}
        checks.record(pending, fresh)  # every rank's copy alike; rank 0 writes it
        bad = {**known, **fresh}  # disjoint: a folder listed again has no verdicts until checked
        if bad and not self.cfg.skip_corrupt:
            unreadable = all(why.startswith("unreadable") for why in bad.values())
            fix = "give this user read access to them" if unreadable else self.source.damaged_fix
            raise DataError(f"{bad_files_line(self.source, bad)}; {fix}, {SKIP_CORRUPT_HINT}")
        self.mark_corrupt(list(bad))

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
