"""Where images come from: the one interface every dataset layout implements (``Source``). Both
backends (torchvision, DALI), the evaluation and ``make-shards`` read through it and never ask
which layout it is.

The layouts, by family:

- ``data_pipeline.image_files``: a folder of image files, with class sub-folders (ImageFolder) or
  without labels (flat or nested);
- ``data_pipeline.arrays``: an ``.npz``, STL-10's binary folder, torchvision's CIFAR-10/100 folders;
- ``data_pipeline.shards``: WebDataset tar shards written by ``simclr make-shards``;

and ``data_pipeline.layouts.open_source`` recognises which one a path holds.

A missing label is -1: pretraining needs none; whatever needs labels asks ``labelled_indices``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

from foundation.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# images that neither decoder reads as a still photo: counted and named, never silently dropped
UNREAD_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".svg")
LabelMode = Literal["auto", "folders", "none"]  # how a folder of image files is labelled (data.labels)
LABEL_MODES: tuple[str, ...] = get_args(LabelMode)
Stored = Literal["decoded", "encoded", "files"]


# the training run's way past a damaged file; a command without data.skip_corrupt replaces it (SKIP_CORRUPT_HINT)
SKIP_CORRUPT_HINT = "or set data.skip_corrupt=true to skip such images"


class DataError(UserError, ValueError):
    """A dataset problem the user must fix (missing path, empty folder, unreadable image)."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader re-raises a worker's error as DataError("Caught DataError in DataLoader worker
        # process N. Original Traceback ... data_pipeline.sources.DataError: <message>"): every loader
        # (training, evaluation, fine-tuning) keeps the one line meant for the user.
        if message.startswith("Caught DataError"):
            last = message.strip().splitlines()[-1]
            prefix = f"{DataError.__module__}.{DataError.__name__}: "
            message = last[len(prefix):] if last.startswith(prefix) else last
        super().__init__(message)


class Source:
    """A dataset of N images in one layout: the base every layout subclasses, holding what most
    layouts share (a layout overrides what it does differently)."""

    location: Path | str  # the folder or file (or object storage URL) it was opened from, for messages
    labels: np.ndarray  # N int64, -1: unlabeled
    classes: list[str]  # empty when unlabeled
    # How a sample is kept: decoded pixels (read with ``read_decoded``), encoded bytes (``read_encoded``),
    # or one encoded file per sample, which a backend may read itself (its path is ``sample_name``).
    stored: Stored
    damaged_fix: str  # what to do about a sample that cannot be decoded
    order_depends_on_world_size = False  # whether a global batch changes with the number of ranks
    file_count: int  # files that hold the dataset (what a start-up lists and opens)

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        """Where sample ``index`` lives, for messages: its file, ``shard.tar:member`` or ``array[i]``."""
        raise NotImplementedError

    def read_encoded(self, index: int) -> bytes:
        """The encoded image bytes of sample ``index`` (``stored`` is ``encoded`` or ``files``)."""
        raise TypeError(f"{type(self).__name__} holds decoded images (read_decoded)")

    def read_decoded(self, indices: np.ndarray) -> np.ndarray:
        """Samples ``indices`` as one dense len x H x W x 3 uint8 array (``stored == 'decoded'``)."""
        raise TypeError(f"{type(self).__name__} holds encoded images (read_encoded)")

    def sample_files(self) -> list[Path]:
        """Each sample's own file, to be checked before a decoder sees it; empty when the samples are
        no files of their own (arrays, or shards, checked when they were written)."""
        return []

    def file_checks(self) -> FileChecks | None:
        """What is known of the sample files' checks (None: no files of their own to check)."""
        return None

    def epoch_order(self, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
        """This rank's samples of ``epoch`` in reading order, the same count on every rank (by
        default a seeded shuffle of all, strided over the ranks)."""
        from data_pipeline.sampling import rank_indices

        return rank_indices(len(self), rank, world_size, seed, epoch)

    def reading_order(self, indices: np.ndarray) -> np.ndarray:
        """``indices`` in the order this layout reads fastest (an evaluation pass's order); the
        same array object when the layout has no preferred order."""
        return indices

    store_retries = 0  # requests to object storage retried so far by this process (data_pipeline.object_store)
    left_out = 0  # samples of the dataset left out when it was opened (missing shards, data.skip_corrupt)
    read_ahead_peak_bytes = 0  # the most bytes ``read_ahead`` held at once in this process

    def read_ahead(self, order: np.ndarray) -> Iterable[bytes] | None:
        """The encoded bytes of ``order``'s samples in order, fetched ahead of their use by a
        thread (a sized iterable with ``close()``), for a layout whose reads are slow one by one
        (object storage); None where ``read_encoded`` sample by sample is the fast way."""
        return None


class FileChecks(Protocol):
    """The check verdicts of a source's sample files (positions are sample indices)."""

    def pending(self) -> list[int]:
        """Samples whose file has not been checked (since it may have changed)."""

    def known_bad(self) -> dict[int, str]:
        """Samples found bad by an earlier check: what is wrong with each."""

    def record(self, checked: list[int], bad: dict[int, str]) -> None:
        """Keep the verdicts of ``checked``; ``bad`` holds those of them that are bad."""


def bad_files_line(source: Source, bad: dict[int, str], shown: int = 5) -> str:
    """Every bad file named (the first ``shown`` of them by path, then a count), so that one pass
    fixes them all: ``cannot decode image PATH: why``, or ``cannot decode N images in LOCATION: PATH
    (why); ...; and K more``."""
    named = sorted((source.sample_name(i), why) for i, why in bad.items())
    if len(named) == 1:
        return f"cannot decode image {named[0][0]}: {named[0][1]}"
    listed = "; ".join(f"{name} ({why})" for name, why in named[:shown])
    more = f"; and {len(named) - shown} more" if len(named) > shown else ""
    return f"cannot decode {len(named)} images in {source.location}: {listed}{more}"


def labelled_indices(source: Source, needed_by: str) -> np.ndarray:
    """Indices of the samples that carry a label; a DataError naming ``needed_by`` when none do."""
    keep = np.flatnonzero(np.asarray(source.labels) >= 0)
    if len(keep) == 0:
        raise DataError(f"{needed_by} needs labelled images, but {source.location} has no labels (an unlabeled folder "
                        "or split); point it at a labelled set (class sub-folders, a labelled .npz, STL-10's "
                        "train/test split, a CIFAR folder)")
    return keep


def typical_image_size(source: Source, samples: int = 16) -> tuple[int, int] | None:
    """The median (width, height) of ``samples`` images spread over ``source``, from their headers
    (no decoding); None when no header tells."""
    from data_pipeline.file_checks import encoded_dimensions

    picked = np.unique(np.linspace(0, len(source) - 1, num=min(samples, len(source))).astype(np.int64))
    if len(picked) == 0:
        return None
    if source.stored == "decoded":
        height, width = source.read_decoded(picked[:1]).shape[1:3]  # one dense array: every image one size
        return int(width), int(height)
    sizes = []
    for index in picked:
        try:
            dims = encoded_dimensions(source.read_encoded(int(index)))
        except (DataError, OSError):  # a damaged file is the file check's business, not this note's
            dims = None
        if dims is not None:
            sizes.append(dims)
    if not sizes:
        return None
    width, height = np.median(np.asarray(sizes), axis=0)
    return int(width), int(height)


def data_fingerprint(source: Source) -> dict:
    """What a run was started on, to notice at a resume that the dataset changed under it: the
    sample count, the class names, and a digest of the listing (each sample's name relative to the
    dataset, and its label), so that a moved dataset matches itself."""
    import hashlib

    prefix = str(source.location).rstrip("/") + "/"
    digest = hashlib.sha1()
    for i in range(len(source)):
        name = source.sample_name(i)
        digest.update((name[len(prefix):] if name.startswith(prefix) else name).encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    digest.update(np.asarray(source.labels, dtype=np.int64).tobytes())
    return {"samples": len(source), "classes": list(source.classes), "listing_sha1": digest.hexdigest()}


def data_changes(started: dict, now: dict) -> list[str]:
    """How the dataset of ``now`` differs from the one a run ``started`` on, one phrase a change
    (empty: the same data)."""
    changes = []
    old_classes, new_classes = started.get("classes", []), now.get("classes", [])
    if old_classes != new_classes:
        added = [c for c in new_classes if c not in old_classes]
        removed = [c for c in old_classes if c not in new_classes]
        said = [f"{what} {', '.join(map(repr, names[:5]))}" for what, names in
                (("classes added:", added), ("classes removed:", removed)) if names]
        said = said or ["the classes were reordered"]
        changes.append(f"{'; '.join(said)} ({len(old_classes)} -> {len(new_classes)} classes)")
    if started.get("samples") != now.get("samples"):
        changes.append(f"{now.get('samples')} images where the run started on {started.get('samples')}")
    elif started.get("listing_sha1") != now.get("listing_sha1") and not changes:
        changes.append("the same number of images, but other files or labels")
    return changes
