"""The DALI-free backend: torchvision v2 transforms in DataLoader workers.

Each sample's randomness is seeded from (run seed, epoch, index), so a resumed run sees exactly
the views an uninterrupted one would, whatever the worker count.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from data_pipeline.augment import eval_transform, finetune_transform, simclr_transform
from data_pipeline.config import DataConfig
from data_pipeline.rank_loader import RankLoader
from data_pipeline.sources import SKIP_CORRUPT_HINT, DataError, Source
from data_pipeline.views import collate_views, view_spec
from foundation.seeds import augmentation_seed


def decode_sample(source: Source, index: int, raw: bytes | None = None) -> torch.Tensor:
    """uint8 CHW RGB tensor of sample ``index`` (grayscale and RGBA become RGB), from its encoded
    bytes ``raw`` when they were read already; DataError naming the file if it cannot be decoded."""
    if source.stored == "decoded":
        return torch.from_numpy(source.read_decoded(np.asarray([index]))[0]).permute(2, 0, 1)
    path, fix = source.sample_name(index), source.damaged_fix
    raw = source.read_encoded(index) if raw is None else raw
    if not raw:
        raise DataError(f"cannot decode image {path}: it is empty (0 bytes); {fix}, {SKIP_CORRUPT_HINT}")
    try:
        return decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}; {fix}, {SKIP_CORRUPT_HINT}") from None


class MultiViewDataset(Dataset):
    """(views, label, corrupt) per sample: every view of the run's view specification at this epoch,
    cut from one decode of the image, in view order."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int) -> None:
        self.source, self.seed, self.epoch = source, seed, 0
        self.skip_corrupt = cfg.skip_corrupt
        self.spec = view_spec(cfg)  # the loader's own, shared
        self._transforms: dict[tuple, v2.Compose] = {}  # by (size, augmentation)

    def view_transforms(self) -> list[v2.Compose]:
        """One transform per view at the current epoch (views of one recipe share theirs)."""
        out = []
        for size, augment in self.spec.views(self.epoch):
            key = (size, dataclasses.astuple(augment))
            if key not in self._transforms:
                self._transforms[key] = simclr_transform(augment, size)
            out.append(self._transforms[key])
        return out

    def __len__(self) -> int:
        return len(self.source)

    def _decode(self, index: int, raw: bytes | None = None) -> tuple[torch.Tensor, int, int]:
        """(image, label, the corrupt sample it replaces or -1), from ``raw`` when the sample's bytes
        came with it (``ReadAheadSampler``). A file that passed the file check but fails to decode is
        replaced by the next good sample, image and label, as the check's findings are
        (``data_pipeline.rank_loader``)."""
        for offset in range(len(self.source)):
            sample = (index + offset) % len(self.source)
            try:
                image = decode_sample(self.source, sample, None if offset else raw)
                return image, int(self.source.labels[sample]), index if offset else -1
            except DataError:
                if not self.skip_corrupt:
                    raise
        raise DataError(f"no image in {self.source.location} could be decoded")

    def __getitem__(self, item: int | tuple[int, bytes]) -> tuple[tuple[torch.Tensor, ...], int, int]:
        index, raw = item if isinstance(item, tuple) else (item, None)
        image, label, corrupt = self._decode(index, raw)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(self.seed, self.epoch, index, bits=47))
            views = tuple(transform(image) for transform in self.view_transforms())
        return views, label, corrupt


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


class ReadAheadSampler:
    """(index, encoded bytes) per sample of ``order``: the DataLoader takes the bytes from the
    source's read-ahead in this process and hands them to its workers with the index, so each
    shard is fetched once per rank however many workers decode it."""

    def __init__(self, order: np.ndarray, ahead: Iterable[bytes]) -> None:
        self.order, self.ahead = order, ahead

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return zip(self.order.tolist(), self.ahead)


class TorchvisionLoader(RankLoader):
    """Iterator of (view size groups, labels) on ``device``; ``steps_per_epoch`` is the same on every rank."""

    backend = "torchvision"

    def __init__(self, source: Source, cfg: DataConfig, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        super().__init__(source, cfg, seed, rank, world_size, device)
        self.dataset = MultiViewDataset(source, cfg, seed)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch, start_step)
        self.dataset.epoch = epoch

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self.check_files()
        if self.cfg.num_workers:
            release_dead_pipelines()
        order = self.replaced(self.indices())
        ahead = self.source.read_ahead(order)  # object storage: the bytes fetched here, decoded in the workers
        sampler = order.tolist() if ahead is None else ReadAheadSampler(order, ahead)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                            num_workers=self.cfg.num_workers, drop_last=True, collate_fn=collate_views,
                            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init,
                            persistent_workers=False)
        try:
            yield from self._batches(loader)
        finally:
            if ahead is not None:
                ahead.close()

    def _batches(self, loader: DataLoader) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for groups, labels, corrupt in loader:
            if (corrupt >= 0).any():
                self.mark_corrupt(corrupt[corrupt >= 0].tolist())
            yield [g.to(self.device, non_blocking=True) for g in groups], labels.to(self.device, non_blocking=True)


class LabelledDataset(Dataset):
    """(transformed image, label) per sample."""

    def __init__(self, source: Source, transform: v2.Transform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode_sample(self.source, index)), int(self.source.labels[index])


def eval_loader(source: Source, cfg: DataConfig, batch_size: int, indices: list[int] | None = None) -> DataLoader:
    """Deterministic resize + centre crop, in dataset order or ``indices`` order (feature extraction)."""
    dataset = LabelledDataset(source, eval_transform(cfg.augment, cfg.image_size))
    if cfg.num_workers:
        release_dead_pipelines()
    return DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=cfg.num_workers, worker_init_fn=_worker_init)


def finetune_loader(source: Source, cfg: DataConfig, indices: list[int], batch_size: int, seed: int) -> DataLoader:
    """Shuffled (seeded) fine-tuning batches of ``indices``, randomly cropped and flipped."""
    dataset = LabelledDataset(source, finetune_transform(cfg.augment, cfg.image_size))
    if cfg.num_workers:
        release_dead_pipelines()
    return DataLoader(Subset(dataset, indices), batch_size=min(batch_size, len(indices)), shuffle=True,
                      num_workers=cfg.num_workers, drop_last=len(indices) > batch_size, worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(seed))
