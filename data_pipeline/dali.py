"""NVIDIA DALI backend: decode once, then two independently augmented SimCLR views.

One pipeline definition serves both modes: on a GPU (``device_id=local_rank``) images are decoded
by nvJPEG (``device="mixed"``) and augmented on the GPU, and batches reach torch without a host
copy; in CPU mode (``device_id=None``) the same graph runs with CPU operators (what CI tests).

Epochs: the pipeline is rebuilt per epoch with this epoch's file list, a seeded global
permutation cut so that every rank gets exactly ``steps_per_epoch`` batches (no DROP-policy
surprises), and handed to ``fn.readers.file`` sharded with ``shard_id=rank, num_shards=world``.
Resuming mid-epoch starts the list at the first unseen sample: positions are exact; the DALI
augmentation draws after a resume are fresh (the torchvision backend is bitwise-reproducible).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.augment import blur_kernel_size, jitter_params
from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.sources import (
    ArraySource,
    DataError,
    ImageFolderSource,
    Source,
    find_corrupt_images,
    shard_indices,
)


def _dali():
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except ImportError as exc:
        raise DataError("data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                        "(or use data.backend=torchvision)") from exc
    return dali, fn, types


def _uniform(fn, low: float, high: float):
    return fn.random.uniform(range=[low, high])


def simclr_view(images, cfg: AugmentConfig, image_size: int, fn, types):
    """One random SimCLR view of a batch of decoded HWC uint8 images (CPU or GPU DataNodes)."""
    view = fn.random_resized_crop(images, size=(image_size, image_size), random_area=list(cfg.crop_scale),
                                  random_aspect_ratio=list(cfg.crop_ratio), antialias=True)
    # Jitter (p) and grayscale (p) in one color_twist: factors are the identity when not drawn,
    # and grayscale is saturation 0 applied after the jitter, as torchvision orders them.
    j = jitter_params(cfg)
    apply = fn.random.coin_flip(probability=cfg.jitter_prob)
    keep = 1 - apply

    def factor(width: float):
        return apply * _uniform(fn, max(0.0, 1 - width), 1 + width) + keep

    gray = fn.random.coin_flip(probability=cfg.grayscale_prob)
    view = fn.color_twist(view, brightness=factor(j["brightness"]), contrast=factor(j["contrast"]),
                          saturation=factor(j["saturation"]) * (1 - gray),
                          hue=apply * _uniform(fn, -360 * j["hue"], 360 * j["hue"]))
    if cfg.blur_prob > 0:
        if fn.random.coin_flip(probability=cfg.blur_prob):
            view = fn.gaussian_blur(view, window_size=blur_kernel_size(image_size),
                                    sigma=_uniform(fn, *cfg.blur_sigma))
    return fn.crop_mirror_normalize(view, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std],
                                    mirror=fn.random.coin_flip(probability=cfg.flip_prob))


def _read_and_decode(files, labels, arrays, shard_id: int, num_shards: int, device_id: int | None, fn, types,
                     pad_last_batch: bool = False):
    """Decoded HWC uint8 images (on the GPU when ``device_id`` is set) and labels: JPEG ``files``
    through readers.file + one decode each, or in-memory ``arrays`` through external_source."""
    if files is not None:
        encoded, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                         random_shuffle=False, pad_last_batch=pad_last_batch, name="Reader")
        images = fn.decoders.image(encoded, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)
        return images, label
    batched = isinstance(arrays, _ArrayBatches)  # eval: whole (possibly short) batches; train: per sample
    images, label = fn.external_source(source=arrays, num_outputs=2, batch=batched, layout=["HWC", ""])
    return (images.gpu() if device_id is not None else images), label


def build_pipeline(files: list[str] | None, labels: list[int] | None, arrays: tuple | None, cfg: DataConfig,
                   batch_size: int, shard_id: int, num_shards: int, seed: int, device_id: int | None):
    """The SimCLR pipeline over JPEG ``files`` (readers.file) or in-memory ``arrays`` (external_source)."""
    dali, fn, types = _dali()

    @dali.pipeline_def(enable_conditionals=True)
    def simclr_pipeline():
        images, label = _read_and_decode(files, labels, arrays, shard_id, num_shards, device_id, fn, types)
        view1 = simclr_view(images, cfg.augment, cfg.image_size, fn, types)
        view2 = simclr_view(images, cfg.augment, cfg.image_size, fn, types)
        return view1, view2, label

    pipe = simclr_pipeline(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id,
                           seed=seed % (2**31 - 1), prefetch_queue_depth=2, exec_dynamic=True)
    pipe.build()
    return pipe


def build_eval_pipeline(files: list[str] | None, labels: list[int] | None, arrays, cfg: DataConfig,
                        batch_size: int, device_id: int | None):
    """Evaluation: resize the shorter side, centre crop, normalise; no augmentation."""
    dali, fn, types = _dali()
    from data_pipeline.augment import eval_resize_size

    @dali.pipeline_def
    def eval_pipeline():
        images, label = _read_and_decode(files, labels, arrays, 0, 1, device_id, fn, types, pad_last_batch=True)
        images = fn.resize(images, resize_shorter=eval_resize_size(cfg.image_size), antialias=True)
        images = fn.crop_mirror_normalize(images, crop=(cfg.image_size, cfg.image_size), crop_pos_x=0.5,
                                          crop_pos_y=0.5, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255 * m for m in cfg.augment.mean],
                                          std=[255 * s for s in cfg.augment.std])
        return images, label

    pipe = eval_pipeline(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id, seed=0,
                         exec_dynamic=True)
    pipe.build()
    return pipe


def dali_eval_batches(source: Source, cfg: DataConfig, batch_size: int, device: torch.device,
                      indices: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) over ``source`` (or ``indices`` of it) in order, the last batch partial."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    order = np.arange(len(source)) if indices is None else np.asarray(indices)
    device_id = (device.index or 0) if device.type == "cuda" else None
    if isinstance(source, ImageFolderSource):
        files = [str(source.paths[i]) for i in order]
        labels = [int(source.labels[i]) for i in order]
        pipe = build_eval_pipeline(files, labels, None, cfg, batch_size, device_id)
        reader = "Reader"
    else:
        pipe = build_eval_pipeline(None, None, _ArrayBatches(source, order, batch_size), cfg, batch_size, device_id)
        reader = None
    if reader:
        it = DALIGenericIterator([pipe], ["images", "label"], reader_name=reader, auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
    else:  # the iterable source ends the epoch itself
        it = DALIGenericIterator([pipe], ["images", "label"], auto_reset=False, prepare_first_batch=False)
    for batch in it:
        yield batch[0]["images"], batch[0]["label"].reshape(-1).long()


class _ArrayBatches:
    """Iterable of (images, labels) batches over ``indices`` of an npz source; the last one may be short."""

    def __init__(self, source: ArraySource, indices: np.ndarray, batch_size: int) -> None:
        self.source, self.indices, self.batch_size = source, indices, batch_size

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size]
            yield ([self.source.images[i] for i in chunk],
                   [np.array([self.source.labels[i]], dtype=np.int32) for i in chunk])


class _ArrayFeed:
    """Per-sample callable for ``fn.external_source`` over this rank's indices of an npz source."""

    def __init__(self, source: ArraySource, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices

    def __call__(self, info):
        if info.idx_in_epoch >= len(self.indices):
            raise StopIteration
        i = self.indices[info.idx_in_epoch]
        return self.source.images[i], np.array([self.source.labels[i]], dtype=np.int32)


class DaliLoader:
    """Same interface as ``TorchvisionLoader``: (view1, view2, labels) on ``device`` per step."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        _dali()
        self.source, self.cfg, self.seed = source, cfg, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size = cfg.batch_size // world_size
        self.steps_per_epoch = (len(source) // world_size) // self.batch_size
        self.epoch, self.start_step = 0, 0
        self.corrupt_skipped = 0
        self.bad_files: set[str] = set()
        if isinstance(source, ImageFolderSource):
            self._scan_files()

    def _scan_files(self) -> None:
        """DALI's decoder can bring the process down on a corrupt file, so files are checked before
        DALI sees them: each rank checks a 1/world slice and the findings are shared."""
        import torch.distributed as dist

        my_slice = self.source.paths[self.rank :: self.world_size]
        mine = find_corrupt_images(my_slice, workers=2 * max(1, self.cfg.num_workers))
        found = [mine]
        if dist.is_initialized() and self.world_size > 1:
            found = [None] * self.world_size
            dist.all_gather_object(found, mine)
        bad = {p: why for part in found for p, why in part.items()}
        if bad and not self.cfg.skip_corrupt:
            path, why = sorted(bad.items())[0]
            raise DataError(f"cannot decode image {path}: {why} ({len(bad)} bad file(s) in {self.source.root}); "
                            "delete or replace it, or set data.skip_corrupt=true to skip such files")
        self.bad_files = {str(p) for p in bad}
        self.corrupt_skipped = len(bad)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def _rank_order(self, rank: int) -> np.ndarray:
        order = shard_indices(len(self.source), rank, self.world_size, self.seed, self.epoch)
        return order[: self.steps_per_epoch * self.batch_size]

    def _pipeline(self, from_step: int):
        device_id = self.device.index if self.device.type == "cuda" else None
        if device_id is None and self.device.type == "cuda":
            device_id = torch.cuda.current_device()
        pipe_seed = hash((self.seed, self.epoch, self.rank, from_step)) & 0x7FFF_FFFF
        start = from_step * self.batch_size
        if isinstance(self.source, ImageFolderSource):
            # Every rank builds the same global list (each rank's remaining chunk, in rank order);
            # readers.file's contiguous sharding then hands rank r exactly its own chunk.
            files, labels = [], []
            for r in range(self.world_size):
                for i in self._rank_order(r)[start:]:
                    files.append(str(self.source.paths[i]))
                    labels.append(int(self.source.labels[i]))
            files, labels = self._replace_bad(files, labels)
            return build_pipeline(files, labels, None, self.cfg, self.batch_size, self.rank, self.world_size,
                                  pipe_seed, device_id)
        feed = _ArrayFeed(self.source, self._rank_order(self.rank)[start:])
        return build_pipeline(None, None, feed, self.cfg, self.batch_size, 0, 1, pipe_seed, device_id)

    def _replace_bad(self, files: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
        """Swap corrupt files for the next good file of the dataset (batch sizes must stay equal on
        every rank for the gathered loss); the swap is the same on every rank."""
        if not self.bad_files:
            return files, labels
        paths = self.source.paths
        out_f, out_l = [], []
        for j, (f, lab) in enumerate(zip(files, labels)):
            k = j
            while f in self.bad_files:
                k += 1
                f = str(paths[k % len(paths)])
                lab = int(self.source.labels[k % len(paths)])
            out_f.append(f)
            out_l.append(lab)
        return out_f, out_l

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = self._pipeline(self.start_step)
        reader = "Reader" if isinstance(self.source, ImageFolderSource) else None
        it = DALIGenericIterator([pipe], ["view1", "view2", "label"], size=-1, auto_reset=False, reader_name=reader,
                                 prepare_first_batch=False)
        try:
            for step in range(self.start_step, self.steps_per_epoch):
                try:
                    batch = next(it)[0]
                except StopIteration:
                    raise RuntimeError(f"DALI ended the epoch early at step {step}/{self.steps_per_epoch}; "
                                       "this is a bug, please report it") from None
                yield (batch["view1"].to(self.device, non_blocking=True),
                       batch["view2"].to(self.device, non_blocking=True),
                       batch["label"].reshape(-1).long().to(self.device, non_blocking=True))
        finally:
            del it, pipe
