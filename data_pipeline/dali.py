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

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.augment import blur_kernel_size, jitter_params
from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.sources import (
    IMAGE_EXTENSIONS,
    ArraySource,
    DataError,
    FileSource,
    ShardSource,
    Source,
    epoch_indices,
)


def _dali():
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except ImportError as exc:
        raise DataError("data.backend=dali needs NVIDIA DALI built for torch's CUDA: pip install nvidia-dali-cuda130 "
                        "(CUDA 13 torch) or nvidia-dali-cuda120 (CUDA 12), or use data.backend=torchvision") from exc
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


@dataclass
class FileList:
    """JPEG/PNG files for ``fn.readers.file``, sharded over ranks by DALI (contiguous parts)."""

    files: list[str]
    labels: list[int]
    shard_id: int = 0
    num_shards: int = 1


@dataclass
class TarList:
    """Tar shards for ``fn.readers.webdataset``, each with an index that lists exactly the samples
    to read, in order (labels come from the host: the order is known)."""

    paths: list[str]
    index_paths: list[str]


def _read_and_decode(reader, device_id: int | None, fn, types, pad_last_batch: bool = False):
    """Decoded HWC uint8 RGB images (on the GPU when ``device_id`` is set) and their labels (None
    for tar shards): files or tars through a DALI reader + one decode each, or in-memory arrays
    through external_source."""
    decoder_device = "mixed" if device_id is not None else "cpu"
    if isinstance(reader, FileList):
        encoded, label = fn.readers.file(files=reader.files, labels=reader.labels, shard_id=reader.shard_id,
                                         num_shards=reader.num_shards, random_shuffle=False,
                                         pad_last_batch=pad_last_batch, name="Reader")
        return fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB), label
    if isinstance(reader, TarList):
        encoded = fn.readers.webdataset(paths=reader.paths, index_paths=reader.index_paths,
                                        ext=[";".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)],
                                        missing_component_behavior="error", random_shuffle=False,
                                        pad_last_batch=pad_last_batch, name="Reader")
        return fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB), None
    batched = isinstance(reader, _ArrayBatches)  # eval: whole (possibly short) batches; train: per sample
    images, label = fn.external_source(source=reader, num_outputs=2, batch=batched, layout=["HWC", ""])
    return (images.gpu() if device_id is not None else images), label


def build_pipeline(reader, cfg: DataConfig, batch_size: int, seed: int, device_id: int | None):
    """The SimCLR pipeline: (view1, view2[, label]) per sample of ``reader`` (a FileList, a
    TarList, or an array feed for external_source)."""
    dali, fn, types = _dali()

    @dali.pipeline_def(enable_conditionals=True)
    def simclr_pipeline():
        images, label = _read_and_decode(reader, device_id, fn, types)
        view1 = simclr_view(images, cfg.augment, cfg.image_size, fn, types)
        view2 = simclr_view(images, cfg.augment, cfg.image_size, fn, types)
        return (view1, view2) if label is None else (view1, view2, label)

    pipe = simclr_pipeline(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id,
                           seed=seed % (2**31 - 1), prefetch_queue_depth=2, exec_dynamic=True)
    pipe.build()
    return pipe


def write_tar_list(source: ShardSource, order: np.ndarray, folder: Path) -> TarList:
    """Index files in ``folder`` that make ``fn.readers.webdataset`` read exactly ``order``: one
    per run of consecutive samples from the same tar (``order`` reads each tar front to back)."""
    paths, index_paths = [], []
    runs = np.flatnonzero(np.diff(source.shard_of[order])) + 1
    for n, run in enumerate(np.split(order, runs)):
        if not len(run):
            continue
        lines = [f"v1.2 {len(run)}"]
        for i in run:
            name = source.names[i]
            lines.append(f"{name[name.index('.') + 1:]} {source.offsets[i]} {source.sizes[i]} {name}")
        index = folder / f"run-{n:06d}.idx"
        index.write_text("\n".join(lines) + "\n")
        paths.append(str(source.shards[source.shard_of[run[0]]]))
        index_paths.append(str(index))
    return TarList(paths, index_paths)


def build_eval_pipeline(reader, cfg: DataConfig, batch_size: int, device_id: int | None):
    """Evaluation: resize the shorter side, centre crop, normalise; no augmentation."""
    dali, fn, types = _dali()
    from data_pipeline.augment import eval_resize_size

    @dali.pipeline_def
    def eval_pipeline():
        images, label = _read_and_decode(reader, device_id, fn, types, pad_last_batch=True)
        images = fn.resize(images, resize_shorter=eval_resize_size(cfg.image_size), antialias=True)
        images = fn.crop_mirror_normalize(images, crop=(cfg.image_size, cfg.image_size), crop_pos_x=0.5,
                                          crop_pos_y=0.5, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255 * m for m in cfg.augment.mean],
                                          std=[255 * s for s in cfg.augment.std])
        return images if label is None else (images, label)

    pipe = eval_pipeline(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id, seed=0,
                         exec_dynamic=True)
    pipe.build()
    return pipe


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def dali_eval_batches(source: Source, cfg: DataConfig, batch_size: int, device: torch.device,
                      indices: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) over ``source`` (or ``indices`` of it) in order, the last batch partial."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    order = np.arange(len(source)) if indices is None else np.asarray(indices)
    device_id = _device_id(device)
    folder = Path(tempfile.mkdtemp(prefix="simclr-dali-eval-"))
    try:
        if isinstance(source, FileSource):
            reader = FileList([str(source.paths[i]) for i in order], [int(source.labels[i]) for i in order])
        elif isinstance(source, ShardSource):
            reader = write_tar_list(source, order, folder)
        else:
            reader = _ArrayBatches(source, order, batch_size)
        pipe = build_eval_pipeline(reader, cfg, batch_size, device_id)
        names = ["images"] if isinstance(reader, TarList) else ["images", "label"]
        if isinstance(reader, _ArrayBatches):  # the iterable source ends the epoch itself
            it = DALIGenericIterator([pipe], names, auto_reset=False, prepare_first_batch=False)
        else:
            it = DALIGenericIterator([pipe], names, reader_name="Reader", auto_reset=False,
                                     last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        seen = 0
        for batch in it:
            images = batch[0]["images"]
            if "label" in batch[0]:
                labels = batch[0]["label"].reshape(-1).long()
            else:
                labels = torch.from_numpy(source.labels[order[seen : seen + len(images)]])
            seen += len(images)
            yield images, labels
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
                 device: torch.device, check_cache: Path | None = None) -> None:
        _dali()
        self.source, self.cfg, self.seed = source, cfg, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size = cfg.batch_size // world_size
        self.steps_per_epoch = (len(source) // world_size) // self.batch_size
        self.epoch, self.start_step = 0, 0
        self.corrupt_skipped = 0
        self.bad_files: set[str] = set()
        if isinstance(source, FileSource):
            self._scan_files(check_cache)

    def _scan_files(self, check_cache: Path | None) -> None:
        """DALI's decoder can bring the process down on a corrupt file, so files are checked before
        DALI sees them: each rank checks a 1/world slice and the findings are shared. Results are
        kept in ``check_cache`` (keyed by path, size and mtime), so a restart re-reads no file
        that has not changed."""
        import torch.distributed as dist

        from data_pipeline.sources import FileCheckCache

        cache = FileCheckCache(check_cache)
        my_slice = self.source.paths[self.rank :: self.world_size]
        mine, checked = cache.find_corrupt(my_slice, workers=2 * max(1, self.cfg.num_workers))
        found = [(mine, checked)]
        if dist.is_initialized() and self.world_size > 1:
            found = [None] * self.world_size
            dist.all_gather_object(found, (mine, checked))
        if self.rank == 0:
            cache.save({k: v for _, part in found for k, v in part.items()})
        bad = {p: why for part, _ in found for p, why in part.items()}
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

    def _rank_order(self) -> np.ndarray:
        order = epoch_indices(self.source, self.rank, self.world_size, self.seed, self.epoch)
        return order[: self.steps_per_epoch * self.batch_size]

    def _pipeline(self, order: np.ndarray, folder: Path):
        """This rank's pipeline over ``order`` (its remaining samples of the epoch, in reading order)."""
        pipe_seed = hash((self.seed, self.epoch, self.rank, self.start_step)) & 0x7FFF_FFFF
        if isinstance(self.source, FileSource):
            files = [str(self.source.paths[i]) for i in order]
            reader = FileList(*self._replace_bad(files, [int(self.source.labels[i]) for i in order]))
        elif isinstance(self.source, ShardSource):
            reader = write_tar_list(self.source, order, folder)
        else:
            reader = _ArrayFeed(self.source, order)
        return build_pipeline(reader, self.cfg, self.batch_size, pipe_seed, _device_id(self.device))

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

        order = self._rank_order()[self.start_step * self.batch_size :]
        folder = Path(tempfile.mkdtemp(prefix="simclr-dali-"))
        pipe = self._pipeline(order, folder)
        with_labels = not isinstance(self.source, ShardSource)
        names = ["view1", "view2", "label"] if with_labels else ["view1", "view2"]
        reader = None if isinstance(self.source, ArraySource) else "Reader"
        it = DALIGenericIterator([pipe], names, size=-1, auto_reset=False, reader_name=reader,
                                 prepare_first_batch=False)
        try:
            for n, step in enumerate(range(self.start_step, self.steps_per_epoch)):
                try:
                    batch = next(it)[0]
                except StopIteration:
                    raise RuntimeError(f"DALI ended the epoch early at step {step}/{self.steps_per_epoch}; "
                                       "this is a bug, please report it") from None
                if with_labels:
                    labels = batch["label"].reshape(-1).long()
                else:  # tar shards: the reading order is ours, so the labels are known here
                    chunk = order[n * self.batch_size : (n + 1) * self.batch_size]
                    labels = torch.from_numpy(self.source.labels[chunk])
                yield (batch["view1"].to(self.device, non_blocking=True),
                       batch["view2"].to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
        finally:
            del it, pipe
            shutil.rmtree(folder, ignore_errors=True)
