"""Data backends behind one seam: ``build_loader`` returns an iterator of (view size groups,
labels) on the run's device (``data_pipeline.views``), with ``steps_per_epoch`` (equal on every
rank) and ``set_epoch(epoch, start_step)`` for mid-epoch resume, whichever backend is chosen."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from data_pipeline.config import DataConfig, check_world_size
from data_pipeline.layouts import open_source
from data_pipeline.object_store import RemoteSettings
from data_pipeline.sources import DataError, Source
from data_pipeline.tree_index import IndexStore
from data_pipeline.views import ViewSpec

__all__ = ["DataError", "IndexStore", "build_eval_batches", "build_loader", "open_source",
           "open_train_source", "open_val_source", "resolve_backend", "ViewLoader"]


class ViewLoader(Protocol):
    """What every training backend offers the trainer (both share ``data_pipeline.rank_loader``)."""

    backend: str  # "torchvision" or "dali"
    source: Source  # the dataset it reads
    steps_per_epoch: int  # the same on every rank
    views: ViewSpec  # the views each batch carries, and their sizes epoch by epoch
    rebuilds: list[tuple[int, float]]  # (epoch, seconds to its first batch) of pipelines rebuilt for a new crop size
    corrupt_skipped: int  # distinct corrupt images found so far, each read as the next good one (data.skip_corrupt)
    store_retries: int  # requests to object storage retried so far by this rank (0 for local data)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch (its shuffle) and the step to start from (mid-epoch resume)."""

    def check_files(self) -> None:
        """Check each sample's file once (a collective); the first iteration does it otherwise."""

    def close(self) -> None:
        """Release the backend's pipeline, threads and buffers (at the end of a run, before exit)."""

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """(size groups, labels) per step on the run's device: each group a float32
        ``(views, images, 3, s, s)`` tensor, views in the specification's order."""


def resolve_backend(cfg: DataConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    if device.type == "cuda":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "torchvision"
        return "dali"
    return "torchvision"


def remote_settings(cfg: DataConfig) -> RemoteSettings:
    return RemoteSettings(cfg.store_timeout_s, cfg.read_ahead_shards, cfg.store_cache, cfg.store_cache_gb,
                          cfg.skip_corrupt)


def open_train_source(cfg: DataConfig, store: IndexStore | None = None) -> Source:
    return open_source(cfg.root, cfg.split, cfg.labels, store, remote_settings(cfg))


def open_val_source(cfg: DataConfig, store: IndexStore | None = None) -> Source:
    return open_source(cfg.val_root, cfg.val_split, cfg.labels, store, remote_settings(cfg))


def build_loader(cfg: DataConfig, seed: int, rank: int, world_size: int, device: torch.device,
                 index_folder: Path | None = None) -> ViewLoader:
    """The training loader for this rank, validated: the global batch must split evenly over
    ranks and every rank's part must hold at least one batch. ``index_folder``: where the job keeps
    its listing of an image tree and the files' checks (the run folder), so that a restart neither
    lists every folder nor reads every file again; rank 0 lists, the others receive."""
    check_world_size(cfg.batch_size, world_size)
    source = open_train_source(cfg, IndexStore(index_folder, rank, world_size))
    per_rank = cfg.batch_size // world_size
    if len(source) // world_size < per_rank:
        raise DataError(f"{cfg.root} holds {len(source)} images: {len(source) // world_size} per rank, fewer than "
                        f"one batch of {per_rank}; lower data.batch_size or add images")
    backend = resolve_backend(cfg, device)
    if cfg.on_device and backend != "dali":
        raise DataError("data.on_device=true is a DALI option (augmenting where the images are kept); set "
                        "data.backend=dali, or data.on_device=false for the torchvision backend")
    if backend == "dali":
        from data_pipeline.dali import DaliLoader

        return DaliLoader(source, cfg, seed, rank, world_size, device)
    from data_pipeline.torchvision_loader import TorchvisionLoader

    return TorchvisionLoader(source, cfg, seed, rank, world_size, device)


def build_eval_batches(cfg: DataConfig, source: Source, device: torch.device, batch_size: int,
                       indices: list[int] | None = None):
    """(images, labels) of ``source`` (or ``indices`` of it) in order, resized and centre-cropped
    with no augmentation, through the same backend the training would use on ``device``. Tar
    shards are read in their stored order (front to back), whatever order ``indices`` has."""
    wanted = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    order = source.reading_order(wanted)
    if indices is not None or order is not wanted:  # the whole set in its own order needs no index list
        indices = order.tolist()
    if resolve_backend(cfg, device) == "dali":
        from data_pipeline.dali import dali_eval_batches

        return dali_eval_batches(source, cfg, batch_size, device, indices)
    from data_pipeline.torchvision_loader import eval_loader

    return eval_loader(source, cfg, batch_size, indices)
