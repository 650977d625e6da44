"""Shard sets in object storage (``data.root: s3://bucket/prefix``): the same ``ShardSource`` as a
local shard folder, its bytes fetched over the network (``data_pipeline.object_store``).

- **Listing**: one LIST of the prefix (each object's size), the manifest and the index files, read
  by rank 0 alone and handed to the other ranks over the process group: one read per job.
- **Training reads** (``ReadAhead``): a rank's epoch order visits each shard's samples together, so
  a thread fetches each run of one shard's samples as one ranged GET (the whole shard when the run
  covers it) while the run before it is trained on, and keeps at most ``data.read_ahead_shards``
  fetched runs waiting. Memory per rank: at most ``read_ahead_shards + 2`` shards' bytes (those
  waiting, the one being fetched, the one being read); the loader's batches in flight come on top.
- **Other reads** (an evaluation pass, the decoder's sizing): one ranged GET per sample.
- **Cache** (``data.store_cache``, optional): whole shards kept in a local folder, at most
  ``data.store_cache_gb``, the least recently used removed first; a shard read twice (the next
  epoch, a restart) then comes from the local disk.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.object_store import ObjectStore, RemoteSettings
from data_pipeline.shards import SHARD_MANIFEST, OpenTars, ShardSource, read_listing
from data_pipeline.sources import DataError
from foundation import collectives
from foundation.atomic_files import atomic_write


class ShardCache:
    """Whole shards in a local folder, at most ``cap_bytes`` in all; the least recently used first out."""

    def __init__(self, folder: Path, cap_bytes: int) -> None:
        self.folder, self.cap_bytes = folder, cap_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.open_tars = OpenTars()

    def path(self, key: str, name: str) -> Path:
        return self.folder / f"{key}-{name}"

    def get(self, path: Path) -> bool:
        if not path.is_file():
            return False
        os.utime(path)  # recently used
        return True

    def put(self, path: Path, data: bytes) -> None:
        atomic_write(path, data)
        kept = sorted((p for p in self.folder.iterdir() if p.is_file() and p.suffix == ".tar"),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for p in kept:
            total += p.stat().st_size
            if total > self.cap_bytes and p != path:
                p.unlink(missing_ok=True)

    def read(self, path: Path, offset: int, size: int) -> bytes:
        return os.pread(self.open_tars.fd(path), size, offset)


class RemoteShardFiles:
    """The shards of a set in object storage (``ShardSource.files``)."""

    def __init__(self, store: ObjectStore, read_ahead_shards: int = 2, cache: ShardCache | None = None) -> None:
        import hashlib

        self.store, self.depth, self.cache = store, read_ahead_shards, cache
        self.peak_bytes = 0  # the most bytes its read-aheads held at once (measured, for the benchmark)
        self.key = hashlib.sha1(store.url.encode()).hexdigest()[:12]  # one cache folder may serve several sets

    @property
    def retries(self) -> int:
        return self.store.retries

    def where(self, name: str) -> str:
        return self.store.url_of(name)

    def read_ahead(self, source: ShardSource, order: np.ndarray) -> ReadAhead:
        return ReadAhead(source, order, self.depth)

    def _cached(self, name: str) -> Path | None:
        """The shard's local copy, fetched whole on a miss (None without a cache)."""
        if self.cache is None:
            return None
        path = self.cache.path(self.key, name)
        if not self.cache.get(path):
            self.cache.put(path, self.store.read(name))
        return path

    def read(self, name: str, offset: int, size: int) -> bytes:
        """One sample's bytes."""
        return self.read_span(name, offset, offset + size)

    def read_span(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of shard ``name``: one ranged GET (or the cache)."""
        path = self._cached(name)
        if path is not None:
            try:
                return self.cache.read(path, start, end - start)
            except FileNotFoundError:  # evicted just now by another rank sharing the folder
                pass
        return self.store.read(name, start, end)


def shard_runs(source: ShardSource, order: np.ndarray) -> list[np.ndarray]:
    """``order`` cut where the shard changes: each piece is read with one request."""
    if not len(order):
        return []
    shard = source.shard_of[order]
    cuts = np.flatnonzero(shard[1:] != shard[:-1]) + 1
    return np.split(order, cuts)


_END = object()


class ReadAhead:
    """The encoded bytes of ``order``'s samples, in order, fetched run by run (``shard_runs``) by a
    thread that keeps at most ``depth`` fetched runs waiting. An error of the store (after its
    retries) is raised where the bytes are asked for. ``close`` stops the thread."""

    def __init__(self, source: ShardSource, order: np.ndarray, depth: int) -> None:
        self.source, self.order = source, np.asarray(order, dtype=np.int64)
        self.held, self.held_lock = 0, threading.Lock()  # bytes fetched and not yet read through
        self.waiting: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fetch, name="shard-read-ahead", daemon=True)
        self.thread.start()

    def __len__(self) -> int:
        return len(self.order)

    def _put(self, item: object) -> bool:
        while not self.stopped.is_set():
            try:
                self.waiting.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fetch(self) -> None:
        files, offsets, sizes = self.source.files, self.source.offsets, self.source.sizes
        try:
            for run in shard_runs(self.source, self.order):
                start, end = int(offsets[run].min()), int((offsets[run] + sizes[run]).max())
                blob = files.read_span(self.source.shards[self.source.shard_of[run[0]]], start, end)
                self._hold(len(blob))
                if not self._put((run, start, blob)):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the reader, which raises it
            self._put(exc)

    def __iter__(self) -> Iterator[bytes]:
        offsets, sizes = self.source.offsets, self.source.sizes
        while True:
            item = self.waiting.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            run, start, blob = item
            view = memoryview(blob)
            for i in run:
                at = int(offsets[i]) - start
                yield bytes(view[at : at + int(sizes[i])])
            self._hold(-len(blob))

    def _hold(self, change: int) -> None:
        with self.held_lock:
            self.held += change
            files = self.source.files
            files.peak_bytes = max(getattr(files, "peak_bytes", 0), self.held)

    def close(self) -> None:
        self.stopped.set()
        while True:
            try:
                self.waiting.get_nowait()
            except queue.Empty:
                break


def _listed(store: ObjectStore) -> dict[str, int]:
    """The store's one listing of the set, which must hold the manifest (written last)."""
    sizes = store.sizes()
    if SHARD_MANIFEST not in sizes:
        raise DataError(f"{store.url} holds no {SHARD_MANIFEST}: not a shard set written by simclr make-shards "
                        "(or not written completely; the manifest is written last). Check the URL, or write the "
                        f"shards with: simclr make-shards SOURCE --out {store.url}")
    return sizes


def check_remote_root(url: str, settings: RemoteSettings) -> None:
    """What a run's first look at the set would refuse (credentials, a missing set or manifest), said
    now: ``simclr train --dry-run``, one listing and nothing read."""
    _listed(ObjectStore(url, settings.timeout_s))


def open_remote_shards(url: str, settings: RemoteSettings) -> ShardSource:
    """The shard set at ``url``, listed by rank 0 (when a process group runs) and shared."""
    store = ObjectStore(url, settings.timeout_s)

    def listing() -> dict:
        sizes = _listed(store)
        return read_listing(store.url, store.read_text(SHARD_MANIFEST), sizes,
                            lambda wanted: {name: store.read_text(name) for name in wanted}, settings.skip_missing)

    shared = collectives.broadcast_object(collectives.on_rank_zero(listing, [DataError]))
    cache = ShardCache(Path(settings.cache).expanduser(), int(settings.cache_gb * 2**30)) if settings.cache else None
    return ShardSource(store.url, RemoteShardFiles(store, settings.read_ahead_shards, cache), **shared)

