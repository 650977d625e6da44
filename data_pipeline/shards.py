"""Writing WebDataset tar shards (``simclr make-shards``): any source this package reads becomes
``shard-000000.tar ...`` with ``<key>.<ext>`` images (plus ``<key>.cls`` when labelled), one DALI
index (``.idx``, v1.2) per shard, and ``manifest.json`` written last.

Samples are written in a seeded random order, so every shard is a random sample of the dataset:
a batch read front to back from one shard is then as varied as one drawn from the whole set.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline.sources import (
    SHARD_MANIFEST,
    ArraySource,
    DataError,
    FileSource,
    Source,
    find_corrupt_images,
    read_encoded,
)

MANIFEST_FORMAT = "simclr-scale-shards"


def _encoded_sample(source: Source, index: int, quality: int) -> tuple[bytes, str]:
    """(encoded bytes, extension): files and shards keep their bytes; arrays become JPEGs."""
    if isinstance(source, ArraySource):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(source.images[index])).save(buffer, "JPEG", quality=quality)
        return buffer.getvalue(), "jpg"
    name = str(source.paths[index]) if isinstance(source, FileSource) else source.names[index]
    return read_encoded(source, index), name.rsplit(".", 1)[-1].lower()


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
    if isinstance(source, FileSource):
        bad = find_corrupt_images(source.paths)
        if bad and not skip_corrupt:
            path, why = sorted(bad.items())[0]
            raise DataError(f"{len(bad)} image file(s) cannot be decoded, e.g. {path}: {why}; delete or replace them, "
                            "or pass --skip-corrupt to leave them out of the shards")
        keep = np.asarray([i for i, p in enumerate(source.paths) if p not in bad], dtype=np.int64)
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
        tmp = out / f".{name}.tmp"
        lines = []
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for position, i in enumerate(chunk, start):
                key = f"{position:09d}"
                data, ext = _encoded_sample(source, int(i), quality)
                line = f"{ext} {_add_member(tar, f'{key}.{ext}', data)} {len(data)} {key}.{ext}"
                if labelled:
                    cls = str(int(labels[i])).encode()
                    line += f" cls {_add_member(tar, f'{key}.cls', cls)} {len(cls)} {key}.cls"
                lines.append(line)
        (out / f"shard-{k:06d}.idx").write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
        os.replace(tmp, out / name)
        entries.append({"name": name, "bytes": (out / name).stat().st_size, "samples": len(chunk),
                        **({"labels": labels[chunk].tolist()} if labelled else {})})
        if progress:
            progress(start + len(chunk), len(order))
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "samples": int(len(order)), "seed": seed,
                "source": str(getattr(source, "root", getattr(source, "path", ""))),
                "classes": list(source.classes) if labelled else [], "shards": entries}
    tmp = out / f".{SHARD_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / SHARD_MANIFEST)
    return manifest
