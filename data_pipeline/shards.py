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
from foundation.atomic_files import atomic_write
from foundation.logs import get_logger

log = get_logger("data")
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


class LocalShardFiles:
    """Shards in a local (or mounted) folder, read with ``pread``."""

    def __init__(self, root: Path) -> None:
        self.root, self.open_tars = root, OpenTars()

    def where(self, name: str) -> str:
        return str(self.root / name)

    def read_ahead(self, source: ShardSource, order: np.ndarray) -> None:
        return None  # pread is fast enough sample by sample

    def read(self, name: str, offset: int, size: int) -> bytes:
        try:
            return os.pread(self.open_tars.fd(self.root / name), size, offset)
        except OSError as exc:
            raise DataError(f"cannot read shard {self.root / name}: {exc}") from None


class ShardSource(Source):
    """WebDataset tar shards (``Source``): sample i is ``sizes[i]`` bytes at ``offsets[i]`` of tar
    ``shards[shard_of[i]]`` (a name in ``files``: a local folder, or object storage); samples of a
    shard are consecutive."""

    stored = "encoded"
    damaged_fix = "write the shards again (simclr make-shards)"
    order_depends_on_world_size = True  # shards are dealt to ranks in blocks

    def __init__(self, root: Path | str, files, shards: list[str], shard_of: np.ndarray, offsets: np.ndarray,
                 sizes: np.ndarray, names: list[str], labels: np.ndarray, classes: list[str],
                 left_out: int = 0) -> None:
        self.location, self.files, self.shards, self.shard_of = root, files, shards, shard_of
        self.left_out = left_out  # samples of missing shards left out (data.skip_corrupt)
        self.offsets, self.sizes, self.names = offsets, sizes, names
        self.labels, self.classes = np.asarray(labels, dtype=np.int64), classes

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def file_count(self) -> int:
        return len(self.shards)

    def shard_ranges(self) -> np.ndarray:
        """(shards + 1) boundaries: the samples of shard k are ``range(b[k], b[k + 1])``."""
        return np.searchsorted(self.shard_of, np.arange(len(self.shards) + 1))

    def sample_name(self, index: int) -> str:
        return f"{self.files.where(self.shards[self.shard_of[index]])}:{self.names[index]}"

    def read_encoded(self, index: int) -> bytes:
        shard = self.shards[self.shard_of[index]]
        data = self.files.read(shard, int(self.offsets[index]), int(self.sizes[index]))
        if len(data) != self.sizes[index]:
            raise DataError(f"shard {self.files.where(shard)} ends inside {self.names[index]}: the file is cut short; "
                            "copy it again")
        return data

    @property
    def store_retries(self) -> int:
        return getattr(self.files, "retries", 0)

    @property
    def read_ahead_peak_bytes(self) -> int:
        return getattr(self.files, "peak_bytes", 0)

    def read_ahead(self, order: np.ndarray):
        return self.files.read_ahead(self, order)

    def epoch_order(self, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
        return block_rank_indices(self.shard_ranges(), rank, world_size, seed, epoch)

    def reading_order(self, indices: np.ndarray) -> np.ndarray:
        return np.sort(indices)  # front to back through each tar


def is_shard_folder(root: Path) -> bool:
    return root.is_dir() and (root / SHARD_MANIFEST).is_file()


def read_wds_index(where: str, text: str) -> list[list[tuple[str, int, int, str]]]:
    """DALI's WebDataset index (v1.2) ``text`` (of the file ``where``): per sample, its components as
    (ext, offset, size, name)."""
    lines = text.splitlines()
    path = where
    if not lines or not lines[0].startswith("v1.2 "):
        raise DataError(f"{path} is not a DALI WebDataset index (v1.2); write the shards again with simclr make-shards")
    samples = []
    for line in lines[1:]:
        f = line.split()
        samples.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    return samples


def read_listing(where: str, manifest_text: str, shard_bytes: dict[str, int | None],
                 index_text: Callable[[list[str]], dict[str, str]], skip_missing: bool = False) -> dict:
    """A shard set's listing from its manifest, checked cheaply: each tar's size (``shard_bytes``,
    None when missing) against the manifest (a copy cut short or a shard rewritten since shows
    here), offsets from the index files (``index_text`` reads several at once). No image is opened.
    ``where`` names the set in messages. ``skip_missing`` (data.skip_corrupt): a missing shard is
    left out, named in a warning, and its samples counted in ``left_out``."""
    manifest_at = f"{where}/{SHARD_MANIFEST}"
    try:
        manifest = json.loads(manifest_text)
        entries = manifest["shards"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_at} is unreadable ({exc}); write the shards again with simclr "
                        "make-shards") from None
    unusable = {}  # shard name -> what is wrong with it
    for entry in entries:
        found = shard_bytes.get(entry["name"])
        if found is None:
            unusable[entry["name"]] = f"shard {where}/{entry['name']} listed in {manifest_at} is missing; copy it again"
        elif found != entry["bytes"]:
            unusable[entry["name"]] = (f"shard {where}/{entry['name']} is {found} bytes, the manifest says "
                                       f"{entry['bytes']}: the copy is incomplete or the shard was changed; copy it "
                                       "again")
    missing = [entry for entry in entries if entry["name"] in unusable]
    if missing and skip_missing:
        left_out = sum(entry["samples"] for entry in missing)
        names = ", ".join(entry["name"] for entry in missing[:5]) + (f" and {len(missing) - 5} more"
                                                                     if len(missing) > 5 else "")
        log.warning(f"{len(missing)} shard(s) listed in {manifest_at} are missing or damaged: {names} (e.g. "
                    f"{unusable[missing[0]['name']]}); left out ({left_out} samples), as data.skip_corrupt asks")
        entries = [entry for entry in entries if entry["name"] not in unusable]
    elif missing:
        raise DataError(f"{unusable[missing[0]['name']]} or write the shards again with simclr make-shards (or set "
                        "data.skip_corrupt=true to train without it)")
    index_names = [entry["name"][: -len(".tar")] + ".idx" for entry in entries]
    no_index = [name for name in index_names if shard_bytes.get(name) is None]
    if no_index:
        raise DataError(f"shard index {where}/{no_index[0]} is missing; write the shards again with simclr make-shards")
    indexes = index_text(index_names)
    shard_of, offsets, sizes, names, labels = [], [], [], [], []
    for k, (entry, index_name) in enumerate(zip(entries, index_names)):
        samples = read_wds_index(f"{where}/{index_name}", indexes[index_name])
        if len(samples) != entry["samples"]:
            raise DataError(f"{where}/{index_name} lists {len(samples)} samples, the manifest says "
                            f"{entry['samples']}; write the shards again with simclr make-shards")
        for components in samples:
            ext, off, size, name = next(c for c in components if "." + c[0] in IMAGE_EXTENSIONS)
            offsets.append(off)
            sizes.append(size)
            names.append(name)
        shard_of.extend([k] * len(samples))
        labels.extend(entry.get("labels") or [-1] * len(samples))
    if not offsets:
        raise DataError(f"the shard folder {where} holds no samples")
    return {"left_out": sum(entry["samples"] for entry in missing),
            "shards": [entry["name"] for entry in entries], "shard_of": np.asarray(shard_of, np.int32),
            "offsets": np.asarray(offsets, np.int64), "sizes": np.asarray(sizes, np.int64), "names": names,
            "labels": np.asarray(labels, np.int64), "classes": list(manifest.get("classes", []))}


def open_shards(root: Path) -> ShardSource:
    """A local shard folder (``read_listing``)."""
    def size(path: Path) -> int | None:
        return path.stat().st_size if path.is_file() else None

    try:
        manifest_text = (root / SHARD_MANIFEST).read_text()
    except OSError as exc:
        raise DataError(f"cannot read {root / SHARD_MANIFEST}: {exc}") from None
    names = [p.name for p in root.iterdir()]
    listing = read_listing(str(root), manifest_text, {name: size(root / name) for name in names},
                           lambda wanted: {name: (root / name).read_text() for name in wanted})
    return ShardSource(root, LocalShardFiles(root), **listing)


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


class _FolderOut:
    """make-shards' output in a local folder: each file written atomically."""

    def __init__(self, out: Path) -> None:
        if out.exists() and not out.is_dir():
            raise DataError(f"{out} is a file; give make-shards a new folder to write into (nothing was changed)")
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out} is not empty; write shards into a new folder (nothing there was changed)")
        self.out = out

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.out / name, data)


class _StoreOut:
    """make-shards' output in object storage (an object is written whole: never seen in part)."""

    def __init__(self, url: str) -> None:
        from data_pipeline.object_store import ObjectStore

        self.store = ObjectStore(url)
        if self.store.sizes():
            raise DataError(f"{self.store.url} is not empty; write shards under a new prefix (nothing there was "
                            "changed)")

    def start(self) -> None:
        pass

    def write(self, name: str, data: bytes) -> None:
        self.store.write(name, data)


def make_shards(source: Source, out: str | Path, shard_size: int, seed: int = 0, quality: int = 95,
                skip_corrupt: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``source`` as tar shards of ``shard_size`` samples into the empty (or new) folder
    ``out``, or under an empty object storage prefix (``s3://bucket/prefix``); returns the
    manifest, which is written last. Corrupt image files are refused (or left out with
    ``skip_corrupt``) here, once, so that training on the shards needs no file check."""
    from data_pipeline.object_store import is_url

    if shard_size < 1:
        raise DataError(f"--shard-size must be a positive number of samples, got {shard_size}")
    target = _StoreOut(str(out)) if is_url(out) else _FolderOut(Path(out))
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
    target.start()
    entries = []
    for k, start in enumerate(range(0, len(order), shard_size)):
        chunk = order[start : start + shard_size]
        name = f"shard-{k:06d}.tar"
        lines = []
        buffer = io.BytesIO()  # one shard in memory at a time
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for position, i in enumerate(chunk, start):
                key = f"{position:09d}"
                data, ext = _encoded_sample(source, int(i), quality)
                line = f"{ext} {_add_member(tar, f'{key}.{ext}', data)} {len(data)} {key}.{ext}"
                if labelled:
                    cls = str(int(labels[i])).encode()
                    line += f" cls {_add_member(tar, f'{key}.cls', cls)} {len(cls)} {key}.cls"
                lines.append(line)
        target.write(name, buffer.getvalue())
        target.write(f"shard-{k:06d}.idx", (f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n").encode())
        entries.append({"name": name, "bytes": len(buffer.getvalue()), "samples": len(chunk),
                        **({"labels": labels[chunk].tolist()} if labelled else {})})
        if progress:
            progress(start + len(chunk), len(order))
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "samples": int(len(order)), "seed": seed,
                "source": str(source.location),
                "classes": list(source.classes) if labelled else [], "shards": entries}
    target.write(SHARD_MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
