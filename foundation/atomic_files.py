"""The one way a file is replaced: written beside its final name, synced, renamed over it. A crash,
a kill or a full disk at any moment leaves the previous file (or none), never a torn one. It lives
in the lowest layer because the data pipeline's own files (tree index, shards) need it too."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(path: Path) -> Path:
    """Where ``path`` is written before the rename: hidden, and named for the writing process (two
    writers never share one; ``.<name>.tmp-*`` finds what a killed one left)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path for a writer that wants a file name (torch.save, tarfile, csv): on leaving the
    block without an error it is synced and renamed over ``path``; on an error it is removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power loss only once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems refuse to sync a folder; the rename has happened
        pass


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) all at once."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
