"""The DALI-free backend: torchvision v2 transforms in DataLoader workers.

Each sample's randomness is seeded from (run seed, epoch, index), so a resumed run sees exactly
the views an uninterrupted one would, whatever the worker count.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.io import ImageReadMode, decode_image

from data_pipeline.augment import eval_transform, simclr_transform
from data_pipeline.config import DataConfig
from data_pipeline.sources import ArraySource, DataError, ShardSource, Source, epoch_indices, read_encoded, sample_name


def decode_sample(source: Source, index: int) -> torch.Tensor:
    """uint8 CHW RGB tensor of sample ``index`` (grayscale and RGBA become RGB); DataError naming
    the file if it cannot be decoded."""
    if isinstance(source, ArraySource):
        return torch.from_numpy(np.ascontiguousarray(source.images[index])).permute(2, 0, 1)
    path = sample_name(source, index)
    raw = read_encoded(source, index)
    # a file can be deleted or replaced; a member of a tar shard means the shards must be written again
    fix = "write the shards again (simclr make-shards)" if isinstance(source, ShardSource) else \
        "delete or replace it"
    if not raw:
        raise DataError(f"cannot decode image {path}: it is empty (0 bytes); {fix}, "
                        "or set data.skip_corrupt=true to skip such images")
    try:
        return decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}; {fix}, "
                        "or set data.skip_corrupt=true to skip such images") from None


class TwoViewDataset(Dataset):
    def __init__(self, source: Source, cfg: DataConfig, seed: int) -> None:
        self.source, self.seed, self.epoch = source, seed, 0
        self.skip_corrupt = cfg.skip_corrupt
        self.transform = simclr_transform(cfg.augment, cfg.image_size)

    def __len__(self) -> int:
        return len(self.source)

    def _decode(self, index: int) -> tuple[torch.Tensor, int]:
        """Decode, replacing a corrupt sample by the next good one when skip_corrupt is on (the
        batch keeps its size, which the gathered loss needs on every rank); returns #replaced."""
        for replaced in range(len(self.source)):
            try:
                return decode_sample(self.source, (index + replaced) % len(self.source)), replaced
            except DataError:
                if not self.skip_corrupt:
                    raise
        raise DataError(f"no image in {getattr(self.source, 'root', '')} could be decoded")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        image, replaced = self._decode(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)  # see data_pipeline/seeds.py
            view1, view2 = self.transform(image), self.transform(image)
        return view1, view2, int(self.source.labels[index]), replaced


def release_dead_pipelines() -> None:
    """Before DataLoader forks its workers: collect DALI pipelines no longer referenced (they hold
    reference cycles, so only the garbage collector frees them). A fork while their threads still
    run copies locks those threads hold, and a worker crashed on one (segmentation fault)."""
    if "nvidia.dali" in sys.modules:
        gc.collect()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes already; threads inside them only contend
    # A signal sent to the whole process group (Ctrl-C, scancel, docker stop, a dropped ssh session)
    # is the main process's to handle (a checkpoint at the next step boundary); a worker that died of
    # it first would take the run down with a traceback instead. So each worker leaves the group.
    # It still ends with the main process: DataLoader stops (or terminates) its workers itself, and a
    # worker whose parent died exits on its own (torch's watchdog). Ignoring the signals instead would
    # make the worker immune to that terminate too, and the main process would wait for it forever.
    os.setpgrp()


class TorchvisionLoader:
    """Iterator of (view1, view2, labels) on ``device``; ``steps_per_epoch`` is the same on every rank."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.source, self.dataset = source, TwoViewDataset(source, cfg, seed)
        self.cfg, self.seed, self.rank, self.world_size, self.device = cfg, seed, rank, world_size, device
        self.batch_size = cfg.batch_size // world_size
        self.steps_per_epoch = (len(source) // world_size) // self.batch_size
        self.epoch, self.start_step = 0, 0
        self.corrupt_skipped = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step
        self.dataset.epoch = epoch

    def indices(self) -> np.ndarray:
        order = epoch_indices(self.dataset.source, self.rank, self.world_size, self.seed, self.epoch)
        return order[self.start_step * self.batch_size : self.steps_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.cfg.num_workers:
            release_dead_pipelines()
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.indices().tolist(),
                            num_workers=self.cfg.num_workers, drop_last=True,
                            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init,
                            persistent_workers=False)
        try:
            yield from self._batches(loader)
        except DataError as exc:  # from a worker: its message carries the worker's traceback
            raise DataError(_worker_message(exc)) from None

    def _batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for view1, view2, labels, replaced in loader:
            self.corrupt_skipped += int(replaced.sum())
            yield (view1.to(self.device, non_blocking=True), view2.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


def _worker_message(exc: DataError) -> str:
    """The original one-line message of a DataError re-raised from a DataLoader worker."""
    lines = str(exc).strip().splitlines()
    last = lines[-1] if lines else ""
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else str(exc)


class EvalDataset(Dataset):
    def __init__(self, source: Source, cfg: DataConfig) -> None:
        self.source = source
        self.transform = eval_transform(cfg.augment, cfg.image_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode_sample(self.source, index)), int(self.source.labels[index])


def eval_loader(source: Source, cfg: DataConfig, batch_size: int, indices: list[int] | None = None) -> DataLoader:
    """Deterministic resize + centre crop, in dataset order or ``indices`` order (feature extraction)."""
    dataset = EvalDataset(source, cfg)
    if cfg.num_workers:
        release_dead_pipelines()
    return DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=cfg.num_workers, worker_init_fn=_worker_init)
