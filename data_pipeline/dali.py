"""NVIDIA DALI backend: decode once, then every view of the view specification cut from that decode.

One pipeline definition serves both modes: on a GPU (``device_id=local_rank``) images are decoded
by nvJPEG (``device="mixed"``) and augmented on the GPU, and batches reach torch without a host
copy; in CPU mode (``device_id=None``) the same graph runs with CPU operators (what CI tests).

One pipeline per run: its input is an ``external_source`` fed whole batches by ``_BatchFeed``,
which walks this rank's samples epoch after epoch (a seeded global permutation per epoch, cut so
that every rank gets exactly ``steps_per_epoch`` batches). The feed hands over file names (read by
``fn.io.file.read`` in DALI's threads), encoded bytes (tar shards) or decoded images (arrays);
as DALI prefetches, the next epoch's first batches are decoded while this one ends, so an epoch
boundary costs nothing. Only a jump (a resume mid-epoch, or any position other than the next)
builds a new pipeline there: positions are exact, and the DALI augmentation draws after a resume
are fresh (the torchvision backend is bitwise-reproducible).

A resolution schedule (``data.views[*].size`` over epochs) changes the crop size at an epoch
boundary. DALI's ``random_resized_crop`` takes its size when the pipeline is built, so the loader
builds a new pipeline at each boundary where a size changes (seeded by that position, so a resume
there gives the same views); the time to its first batch is kept in ``rebuilds`` and logged.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from data_pipeline.augment import SOLARIZE_THRESHOLD, blur_kernel_size, jitter_params
from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.decoder_sizing import MAX_DEVICE_PADDING, MAX_HOST_PADDING, DecoderSizing, decoder_sizing
from data_pipeline.rank_loader import RankLoader
from data_pipeline.sources import DataError, Source
from data_pipeline.views import stack_size_groups
from foundation.seeds import augmentation_seed


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
    if cfg.solarize_prob > 0:
        if fn.random.coin_flip(probability=cfg.solarize_prob):
            bright = view >= SOLARIZE_THRESHOLD
            view = fn.cast(bright * (255 - view) + (1 - bright) * view, dtype=types.UINT8)
    return fn.crop_mirror_normalize(view, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std],
                                    mirror=fn.random.coin_flip(probability=cfg.flip_prob))


class BatchSlice(NamedTuple):
    """Rows ``start:stop`` of ``order``: one rank's sample order for an epoch, held as its own
    contiguous array (so the on-device feed uploads it once and slices it, with no pointer
    arithmetic on a strided view)."""

    order: np.ndarray
    start: int
    stop: int


class _BatchFeed:
    """``fn.external_source`` input (``batch=True``): for each ``BatchSlice``, the samples as DALI
    takes them (file names as bytes, encoded bytes, or one dense N x H x W x 3 array of decoded
    images) and their labels (int32, -1 when unlabeled). Ends when ``batches`` ends."""

    def __init__(self, source: Source, batches: Iterable[BatchSlice], replacement: np.ndarray | None = None,
                 device_images: torch.Tensor | None = None) -> None:
        self.source, self.batches, self.replacement = source, iter(batches), replacement
        self.labels = np.asarray(source.labels, dtype=np.int32)  # once: a list of 1.28M labels is slow to convert
        self.device_images = device_images  # data.on_device: the whole array set, uploaded once
        if device_images is not None:
            self.device_labels = torch.from_numpy(self.labels).to(device_images.device).reshape(-1, 1)
        self._order: tuple[np.ndarray, torch.Tensor] | None = None  # an epoch's order, and its copy on the device
        self._ahead: list | None = None  # object storage: [epoch order, next position, bytes iterator, read-ahead]

    def _on_device(self, batch: BatchSlice) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch gathered on the device from the epoch's order, which is uploaded once per
        epoch (corrupt samples already replaced): no host-to-device copy per batch."""
        if self._order is None or self._order[0] is not batch.order:
            order = batch.order if self.replacement is None else self.replacement[batch.order]
            self._order = (batch.order, torch.from_numpy(np.ascontiguousarray(order)).to(self.device_images.device))
        rows = self._order[1][batch.start : batch.stop]
        images, labels = self.device_images[rows], self.device_labels[rows]
        if images.device.type == "cpu":  # numpy views: DALI would ask torch for a CUDA stream for a tensor
            return images.numpy(), labels.numpy()
        return images, labels  # DALI copies them on torch's current stream, where they were gathered

    def __iter__(self) -> _BatchFeed:
        return self

    def __next__(self) -> tuple[object, np.ndarray]:
        batch = next(self.batches)
        if self.device_images is not None:
            return self._on_device(batch)
        idx = batch.order[batch.start : batch.stop]
        if self.replacement is not None:  # corrupt files: the next good sample, image and label (rank_loader)
            idx = self.replacement[idx]
        labels = self.labels[idx].reshape(-1, 1)
        if self.source.stored == "decoded":
            return self.source.read_decoded(idx), labels
        if self.source.stored == "files":  # read by fn.io.file.read in DALI's threads
            # the file system's bytes (os.fsencode): a name that is not UTF-8 reaches DALI as it is on disk
            return [np.frombuffer(os.fsencode(self.source.sample_name(int(i))), dtype=np.uint8) for i in idx], labels
        return self._encoded(batch, idx), labels

    def _encoded(self, batch: BatchSlice, idx: np.ndarray) -> list[np.ndarray]:
        """The batch's encoded images: from the source's read-ahead over the rest of the epoch when
        it has one (object storage; a jump starts a new one), else read one by one."""
        ahead = self._ahead
        if ahead is None or ahead[0] is not batch.order or ahead[1] != batch.start:
            self.close()
            size = batch.stop - batch.start
            rest = batch.order[batch.start : len(batch.order) - len(batch.order) % size]
            stream = self.source.read_ahead(rest if self.replacement is None else self.replacement[rest])
            if stream is None:
                return [np.frombuffer(self.source.read_encoded(int(i)), dtype=np.uint8) for i in idx]
            ahead = self._ahead = [batch.order, batch.start, iter(stream), stream]
        ahead[1] = batch.stop
        return [np.frombuffer(next(ahead[2]), dtype=np.uint8) for _ in idx]

    def close(self) -> None:
        """Stop the read-ahead thread, if any."""
        if self._ahead is not None:
            self._ahead[3].close()
            self._ahead = None


def _decoded(source: Source, feed: _BatchFeed, device_id: int | None, fn, types, sizing: DecoderSizing | None):
    """Decoded HWC uint8 RGB images (on the GPU when ``device_id`` is set) and their labels."""
    if feed.device_images is not None:  # data.on_device: batches gathered where they are augmented
        return fn.external_source(source=feed, num_outputs=2, batch=True, layout=["HWC", ""],
                                  dtype=[types.UINT8, types.INT32], device="gpu" if device_id is not None else "cpu")
    if source.stored == "decoded":
        images, label = fn.external_source(source=feed, num_outputs=2, batch=True, layout=["HWC", ""],
                                           dtype=[types.UINT8, types.INT32])
        return (images.gpu() if device_id is not None else images), label
    encoded, label = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
    if source.stored == "files":
        encoded = fn.io.file.read(encoded)  # in DALI's threads, not the training thread
    if device_id is None:
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB), label
    sizing = sizing or DecoderSizing(0, 0, MAX_DEVICE_PADDING, MAX_HOST_PADDING)
    return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=0.65,
                             device_memory_padding=sizing.device_padding, host_memory_padding=sizing.host_padding,
                             preallocate_width_hint=sizing.max_width, preallocate_height_hint=sizing.max_height), label


def build_pipeline(source: Source, feed: _BatchFeed, cfg: DataConfig, views: list[tuple[int, AugmentConfig]],
                   batch_size: int, seed: int, device_id: int | None, sizing: DecoderSizing | None = None):
    """The SimCLR pipeline: every view of ``views`` ((size, augmentation) each), then the label,
    per sample that ``feed`` hands over; each image is decoded once."""
    dali, fn, types = _dali()

    @dali.pipeline_def(enable_conditionals=True)
    def simclr_pipeline():
        images, label = _decoded(source, feed, device_id, fn, types, sizing)
        return (*(simclr_view(images, augment, size, fn, types) for size, augment in views), label)

    pipe = simclr_pipeline(batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id,
                           seed=seed % (2**31 - 1), prefetch_queue_depth=cfg.prefetch_depth, exec_dynamic=True)
    pipe.build()
    return pipe


def build_eval_pipeline(source: Source, feed: _BatchFeed, cfg: DataConfig, batch_size: int, device_id: int | None,
                        sizing: DecoderSizing | None = None):
    """Evaluation: resize the shorter side, centre crop, normalise; no augmentation."""
    dali, fn, types = _dali()
    from data_pipeline.augment import eval_resize_size

    @dali.pipeline_def
    def eval_pipeline():
        images, label = _decoded(source, feed, device_id, fn, types, sizing)
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


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def dali_eval_batches(source: Source, cfg: DataConfig, batch_size: int, device: torch.device,
                      indices: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) over ``source`` (or ``indices`` of it) in order, the last batch partial."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    order = np.arange(len(source)) if indices is None else np.ascontiguousarray(indices, dtype=np.int64)
    batches = (BatchSlice(order, start, min(start + batch_size, len(order)))
               for start in range(0, len(order), batch_size))
    device_id = _device_id(device)
    sizing = decoder_sizing(source) if device_id is not None else None
    pipe = build_eval_pipeline(source, _BatchFeed(source, batches), cfg, batch_size, device_id, sizing)
    for batch in DALIGenericIterator([pipe], ["images", "label"], auto_reset=False, prepare_first_batch=False):
        yield batch[0]["images"], batch[0]["label"].reshape(-1).long()


class DaliLoader(RankLoader):
    """(view size groups, labels) on ``device`` per step, from one DALI pipeline that runs across
    epochs (``pipelines_built`` counts the builds; ``rebuilds`` holds (epoch, seconds to the first
    batch) of those a resolution schedule asked for)."""

    backend = "dali"

    def __init__(self, source: Source, cfg: DataConfig, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        _dali()
        super().__init__(source, cfg, seed, rank, world_size, device)
        self.pipelines_built = 0
        # only the GPU decoder (device="mixed") pre-allocates: size it to this dataset's images
        self.decoder_sizing = decoder_sizing(source) if device.type == "cuda" else None
        self.device_images = self._upload() if cfg.on_device else None
        self._batches: Iterator | None = None  # the running pipeline's DALI iterator
        self._next = (-1, -1)  # the (epoch, step) its next batch belongs to
        self._sizes: list[int] = []  # the running pipeline's view sizes

    def _upload(self) -> torch.Tensor:
        """data.on_device: the whole array set on the device, once per run (CIFAR-10: 150 MB as uint8)."""
        if self.source.stored != "decoded":
            raise DataError(f"data.on_device=true keeps an array dataset (.npz, CIFAR or STL-10 folder) on the device; "
                            f"{self.source.location} holds encoded images: set data.on_device=false, or convert it to "
                            ".npz")
        images = self.source.read_decoded(np.arange(len(self.source)))
        return torch.from_numpy(images).to(self.device)

    def _start(self, epoch: int, step: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self._batches is not None:  # release the old pipeline's threads and buffers before the new one's
            self.close()
        batches = rank_batches(self.source, self.rank, self.world_size, self.seed, self.batch_size, epoch, step)
        feed = self._feed = _BatchFeed(self.source, batches, self.replacement, self.device_images)
        pipe_seed = augmentation_seed(self.seed, epoch, self.rank, step, bits=31)
        views = self.views.views(epoch)
        pipe = build_pipeline(self.source, feed, self.cfg, views, self.batch_size, pipe_seed, _device_id(self.device),
                              self.decoder_sizing)
        self._batches = DALIGenericIterator([pipe], [*(f"view{v}" for v in range(len(views))), "label"], size=-1,
                                            auto_reset=False, prepare_first_batch=False)
        self.pipelines_built += 1
        self._next, self._sizes = (epoch, step), [size for size, _ in views]

    def close(self) -> None:
        """Release the pipeline (its threads and buffers) now; the next iteration builds a new one.
        Shut down here, not left to DALI's clean-up at interpreter exit (which reports aborts)."""
        if getattr(self, "_feed", None) is not None:
            self._feed.close()
        self._batches, self._next, self._feed = None, (-1, -1), None
        gc.collect()  # the iterator and pipeline hold reference cycles: freed (and shut down) here

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self.check_files()  # before DALI's decoder sees a file: a corrupt one can bring the process down
        resized = self._batches is not None and self._sizes != self.views.sizes(self.epoch)
        if self._batches is None or self._next != (self.epoch, self.start_step) or resized:
            started = time.perf_counter()
            self._start(self.epoch, self.start_step)  # a resume, a jump or a new crop size: the only rebuilds
        for step in range(self.start_step, self.steps_per_epoch):
            batch = next(self._batches)[0]
            if resized:
                self.rebuilds.append((self.epoch, time.perf_counter() - started))
                resized = False
            last = step + 1 == self.steps_per_epoch
            self._next = (self.epoch + 1, 0) if last else (self.epoch, step + 1)
            views = [batch[f"view{v}"].to(self.device, non_blocking=True) for v in range(len(self._sizes))]
            yield stack_size_groups(views), batch["label"].reshape(-1).long().to(self.device, non_blocking=True)


def rank_batches(source: Source, rank: int, world_size: int, seed: int, batch_size: int, epoch: int,
                 step: int) -> Iterator[BatchSlice]:
    """This rank's batches from (epoch, step) on, epoch after epoch, without end (a free function:
    the feed it drives must not hold the loader, or the pipeline would be kept alive by a
    reference cycle). Each epoch's order is copied into its own contiguous array: the source's
    order is a strided view of the global permutation on every rank but the only one."""
    steps = (len(source) // world_size) // batch_size
    while True:
        order = np.ascontiguousarray(source.epoch_order(rank, world_size, seed, epoch))
        for s in range(step, steps):
            yield BatchSlice(order, s * batch_size, (s + 1) * batch_size)
        epoch, step = epoch + 1, 0
