"""WebDataset tar shards, read and written.

Writing (``simclr make-shards``): any source this package reads becomes ``shard-000000.tar ...``
with ``<key>.<ext>`` images (plus ``<key>.cls`` when labelled), one DALI index (``.idx``, v1.2)
per shard, and ``manifest.json`` written last. Samples are written in a seeded random order, so
every shard is a random sample of the dataset: a batch read front to back from one shard is then
as varied as one drawn from the whole set.

Reading (``ShardSource``): the manifest and index files give each image's byte range; images are
read with ``pread`` through a small cache of open tar files that each source owns.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline.file_checks import find_corrupt_images
from data_pipeline.sampling import block_rank_indices
from data_pipeline.sources import IMAGE_EXTENSIONS, DataError, Source
from foundation.atomic_files import atomic_path, atomic_write

SHARD_MANIFEST = "manifest.json"  # written last by make-shards: its presence marks a complete set
MAX_OPEN_TARS = 16  # per process: a rank's workers read a few tars at a time; far below a 1024-fd limit


class OpenTars:
    """A small per-process LRU of open tar files. ``pread`` needs no shared file offset, so forked
    DataLoader workers stay independent; the fds a fork inherits are closed in the child, and a
    pickled copy (a spawned worker) starts empty."""

    def __init__(self, limit: int = MAX_OPEN_TARS) -> None:
        self.limit, self.pid = limit, os.getpid()
        self.fds: OrderedDict[Path, int] = OrderedDict()  # least recently used first

    def __getstate__(self) -> dict:
        return {"limit": self.limit, "pid": 0, "fds": OrderedDict()}

    def fd(self, tar: Path) -> int:
        if self.pid != os.getpid():
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            self.pid = os.getpid()
        if tar in self.fds:
            self.fds.move_to_end(tar)
            return self.fds[tar]
        fd = self.fds[tar] = os.open(tar, os.O_RDONLY)
        while len(self.fds) > self.limit:
            os.close(self.fds.popitem(last=False)[1])
        return fd


class ShardSource(Source):
    """WebDataset tar shards (``Source``): sample i is ``sizes[i]`` bytes at ``offsets[i]`` of tar
    ``shards[shard_of[i]]``; samples of a shard are consecutive."""

    stored = "encoded"
    damaged_fix = "write the shards again (simclr make-shards)"
    order_depends_on_world_size = True  # shards are dealt to ranks in blocks

    def __init__(self, root: Path, shards: list[Path], shard_of: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                 names: list[str], labels: np.ndarray, classes: list[str]) -> None:
        self.location, self.shards, self.shard_of = root, shards, shard_of
        self.offsets, self.sizes, self.names = offsets, sizes, names
        self.labels, self.classes = np.asarray(labels, dtype=np.int64), classes
        self.open_tars = OpenTars()

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def file_count(self) -> int:
        return len(self.shards)

    def shard_ranges(self) -> np.ndarray:
        """(shards + 1) boundaries: the samples of shard k are ``range(b[k], b[k + 1])``."""
        return np.searchsorted(self.shard_of, np.arange(len(self.shards) + 1))

    def sample_name(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]}:{self.names[index]}"

    def read_encoded(self, index: int) -> bytes:
        tar = self.shards[self.shard_of[index]]
        try:
            data = os.pread(self.open_tars.fd(tar), int(self.sizes[index]), int(self.offsets[index]))
        except OSError as exc:
            raise DataError(f"cannot read {self.names[index]} from shard {tar}: {exc}") from None
        if len(data) != self.sizes[index]:
            raise DataError(f"shard {tar} ends inside {self.names[index]}: the file is cut short; copy it again")
        return data

    def epoch_order(self, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
        return block_rank_indices(self.shard_ranges(), rank, world_size, seed, epoch)

    def reading_order(self, indices: np.ndarray) -> np.ndarray:
        return np.sort(indices)  # front to back through each tar


def is_shard_folder(root: Path) -> bool:
    return root.is_dir() and (root / SHARD_MANIFEST).is_file()


def read_wds_index(path: Path) -> list[list[tuple[str, int, int, str]]]:
    """DALI's WebDataset index (v1.2): per sample, its components as (ext, offset, size, name)."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise DataError(f"{path} is not a DALI WebDataset index (v1.2); write the shards again with simclr make-shards")
    samples = []
    for line in lines[1:]:
        f = line.split()
        samples.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    return samples


def open_shards(root: Path) -> ShardSource:
    """A shard folder, checked cheaply: each tar's size against the manifest (a copy cut short or
    a shard rewritten since shows here), offsets from the index files. No image is opened."""
    try:
        manifest = json.loads((root / SHARD_MANIFEST).read_text())
        entries = manifest["shards"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{root / SHARD_MANIFEST} is unreadable ({exc}); write the shards again with "
                        "simclr make-shards") from None
    shards, shard_of, offsets, sizes, names, labels = [], [], [], [], [], []
    for k, entry in enumerate(entries):
        tar = root / entry["name"]
        if not tar.is_file():
            raise DataError(f"shard {tar} listed in {root / SHARD_MANIFEST} is missing; copy it again or write the "
                            "shards again with simclr make-shards")
        if tar.stat().st_size != entry["bytes"]:
            raise DataError(f"shard {tar} is {tar.stat().st_size} bytes, the manifest says {entry['bytes']}: the copy "
                            "is incomplete or the shard was changed; copy it again or write the shards again")
        index = tar.with_suffix(".idx")
        if not index.is_file():
            raise DataError(f"shard index {index} is missing; write the shards again with simclr make-shards")
        samples = read_wds_index(index)
        if len(samples) != entry["samples"]:
            raise DataError(f"{index} lists {len(samples)} samples, the manifest says {entry['samples']}; write the "
                            "shards again with simclr make-shards")
        for components in samples:
            ext, off, size, name = next(c for c in components if "." + c[0] in IMAGE_EXTENSIONS)
            offsets.append(off)
            sizes.append(size)
            names.append(name)
        shards.append(tar)
        shard_of.extend([k] * len(samples))
        labels.extend(entry.get("labels") or [-1] * len(samples))
    if not offsets:
        raise DataError(f"the shard folder {root} holds no samples")
    return ShardSource(root, shards, np.asarray(shard_of, np.int32), np.asarray(offsets, np.int64),
                       np.asarray(sizes, np.int64), names, np.asarray(labels, np.int64),
                       list(manifest.get("classes", [])))


MANIFEST_FORMAT = "simclr-scale-shards"


def _encoded_sample(source: Source, index: int, quality: int) -> tuple[bytes, str]:
    """(encoded bytes, extension): files and shards keep their bytes; arrays become JPEGs."""
    if source.stored == "decoded":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(source.read_decoded(np.asarray([index]))[0]).save(buffer, "JPEG", quality=quality)
        return buffer.getvalue(), "jpg"
    return source.read_encoded(index), source.sample_name(index).rsplit(".", 1)[-1].lower()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one regular file; returns the byte offset of its data (ustar: one 512-byte header)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: the same input gives the same bytes
    header_at = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return header_at + tarfile.BLOCKSIZE


def make_shards(source: Source, out: str | Path, shard_size: int, seed: int = 0, quality: int = 95,
                skip_corrupt: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``source`` as tar shards of ``shard_size`` samples into the empty (or new) folder
    ``out``; returns the manifest. Corrupt image files are refused (or left out with
    ``skip_corrupt``) here, once, so that training on the shards needs no file check."""
    out = Path(out)
    if shard_size < 1:
        raise DataError(f"--shard-size must be a positive number of samples, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give make-shards a new folder to write into (nothing was changed)")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; write shards into a new folder (nothing there was changed)")
    keep = np.arange(len(source))
    files = source.sample_files()
    if files:
        bad = find_corrupt_images(files)
        if bad and not skip_corrupt:
            path, why = sorted(bad.items())[0]
            raise DataError(f"{len(bad)} image file(s) cannot be decoded, e.g. {path}: {why}; delete or replace them, "
                            "or pass --skip-corrupt to leave them out of the shards")
        keep = np.asarray([i for i, p in enumerate(files) if p not in bad], dtype=np.int64)
    if not len(keep):
        raise DataError("no image of the source can be decoded; nothing to write")
    order = keep[np.random.default_rng(seed).permutation(len(keep))]
    labels = np.asarray(source.labels, dtype=np.int64)
    labelled = bool(len(order)) and bool((labels[order] >= 0).all())
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, start in enumerate(range(0, len(order), shard_size)):
        chunk = order[start : start + shard_size]
        name = f"shard-{k:06d}.tar"
        lines = []
        with atomic_path(out / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for position, i in enumerate(chunk, start):
                key = f"{position:09d}"
                data, ext = _encoded_sample(source, int(i), quality)
                line = f"{ext} {_add_member(tar, f'{key}.{ext}', data)} {len(data)} {key}.{ext}"
                if labelled:
                    cls = str(int(labels[i])).encode()
                    line += f" cls {_add_member(tar, f'{key}.cls', cls)} {len(cls)} {key}.cls"
                lines.append(line)
        atomic_write(out / f"shard-{k:06d}.idx", f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
        entries.append({"name": name, "bytes": (out / name).stat().st_size, "samples": len(chunk),
                        **({"labels": labels[chunk].tolist()} if labelled else {})})
        if progress:
            progress(start + len(chunk), len(order))
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "samples": int(len(order)), "seed": seed,
                "source": str(source.location),
                "classes": list(source.classes) if labelled else [], "shards": entries}
    atomic_write(out / SHARD_MANIFEST, json.dumps(manifest, indent=1))
    return manifest
