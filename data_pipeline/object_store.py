"""Object storage (``s3://``, and any other fsspec URL whose driver is installed: ``gs://``,
``https://``) as a place shard sets live: reads and writes with retries, and the rule for
credentials.

Retries are ours, not the client's: s3fs and botocore are told not to retry, so that every retry is
counted (``data/store_retries``) and the whole wait is bounded by ``data.store_timeout_s``. A
missing object is named at once; refused credentials are one line; anything else (a reset or
refused connection, a 5xx, a read that times out) is retried with backoff until the store has
failed for longer than the timeout.

Credentials come the way the client's users set them (for S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and its files, an instance role; an S3-compatible
server's address in ``AWS_ENDPOINT_URL``); a URL that carries a password is refused without
being echoed, so that no secret reaches a log, a config or a checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from data_pipeline.sources import DataError

T = TypeVar("T")
STORE_EXTRA = "pip install 'simclr-scale[s3]'"
REQUEST_TIMEOUT_S = 30.0  # one request's connect or read; a slower answer is a transient failure


@dataclass(frozen=True)
class RemoteSettings:
    """How a run reads a shard set in object storage (the ``data.store_*`` and
    ``data.read_ahead_shards`` settings)."""

    timeout_s: float = 120.0
    read_ahead_shards: int = 2
    cache: str = ""
    cache_gb: float = 20.0
    skip_missing: bool = False  # data.skip_corrupt: a shard missing from the store is left out, not an error


class StoreUnavailable(DataError):
    """The store failed every try for longer than ``data.store_timeout_s``."""


def check_data_roots(root: str, val_root: str = "") -> None:
    """``data.root`` (and ``data.val_root`` when given) exist: a local path on this host; an object
    storage URL is left to the ranks' listing, which says whether it is there."""
    for key, path in (("data.root", root), ("data.val_root", val_root)):
        if path and is_url(path):
            continue
        if (key == "data.root" or path) and not (path and Path(path).exists()):
            raise DataError(f"data path {path or '(empty)'} does not exist; set {key} to an image folder, an .npz "
                            "file, an STL-10 or CIFAR folder, or a folder of tar shards (local, or s3://bucket/prefix)")


def is_url(root: object) -> bool:
    """Whether a data root names object storage (``scheme://...``) rather than a local path."""
    text = str(root)
    return "://" in text and not text.startswith("file://")


def redacted(url: str) -> str:
    """``url`` with any user name and password replaced by ``***``."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _is_transient(exc: BaseException) -> bool:
    """A failure that another try may not meet: anything but a missing object, refused access, or a
    bad request of ours."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, DataError)):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or type(exc).__module__.split(".")[0] in (
        "aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "fsspec", "s3fs", "gcsfs")


def _credentials_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    return isinstance(exc, PermissionError) or name in ("NoCredentialsError", "PartialCredentialsError")


def _filesystem(url: str):
    """The fsspec file system for ``url`` and the path inside it; a DataError naming the extra to
    install when its driver is missing."""
    try:
        import fsspec
    except ImportError:
        raise DataError(f"the data root {url} is object storage, which needs fsspec and its driver: "
                        f"{STORE_EXTRA}") from None
    options = {}
    if urlsplit(url).scheme in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise DataError(f"the data root {url} is on S3, which needs s3fs: {STORE_EXTRA}") from None
        # one try per call (ours are counted and bounded); an answer that never comes ends as a timeout
        options = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                                     "connect_timeout": REQUEST_TIMEOUT_S, "read_timeout": REQUEST_TIMEOUT_S}}
        # fsspec caches clients by their arguments, not by the environment the client reads: name the
        # endpoint here so that a process whose AWS_ENDPOINT_URL changes never reuses the old store's client
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own loop (5 tries by default)
        return fs, path
    except (ImportError, ValueError) as exc:
        raise DataError(f"cannot open the data root {url}: {exc} (s3://: {STORE_EXTRA}; gs://: pip install "
                        "gcsfs)") from None


class ObjectStore:
    """A folder of objects at ``url``; every call retried as the module says. ``retries`` counts
    the retries this process made (the loop logs it as ``data/store_retries``)."""

    def __init__(self, url: str, timeout_s: float = 120.0, sleep: Callable[[float], None] = time.sleep) -> None:
        parts = urlsplit(url)
        if parts.password or (parts.username and parts.scheme != "file"):
            raise DataError(f"the data URL {redacted(url)} carries credentials; remove them from the URL and set them "
                            "the way the storage client reads them (for s3://: AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role), so that no secret is logged")
        self.fs, root = _filesystem(url)
        self.url, self.root = url.rstrip("/"), root.rstrip("/")
        self.timeout_s, self.sleep, self.retries = timeout_s, sleep, 0

    def __getstate__(self) -> dict:
        # a DataLoader worker or a spawned rank builds its own client (fsspec caches instances)
        return {**self.__dict__, "fs": None, "retries": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fs = _filesystem(self.url)[0]

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _call(self, what: str, name: str, call: Callable[[], T]) -> T:
        """``call()``, retried with backoff (0.1 s doubling to 2 s) while it fails transiently and
        for at most ``timeout_s`` after its first failure."""
        first_failure, delay = None, 0.1
        while True:
            try:
                return call()
            except FileNotFoundError:
                raise DataError(f"{self.url_of(name)} is missing from the store") from None
            except Exception as exc:
                if _credentials_error(exc):
                    raise DataError(f"the store refused to {what} {self.url_of(name)} ({type(exc).__name__}: "
                                    f"{str(exc)[:200]}); check the credentials (for S3: AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance role) and the bucket's "
                                    "permissions") from None
                if not _is_transient(exc):
                    raise
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure >= self.timeout_s:
                    raise StoreUnavailable(
                        f"the object store did not answer for {now - first_failure:.0f} s (data.store_timeout_s="
                        f"{self.timeout_s:g}) while trying to {what} {self.url_of(name)}: {type(exc).__name__}: "
                        f"{str(exc)[:200]}; check the store and the network, then resume the run") from None
                self.retries += 1
                self.sleep(min(delay, max(0.0, self.timeout_s - (now - first_failure))))
                delay = min(2 * delay, 2.0)

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of object ``name`` (the whole object by default)."""
        data = self._call("read", name, lambda: self.fs.cat_file(self._path(name), start=start, end=end))
        if start is not None and end is not None and len(data) != end - start:
            raise DataError(f"{self.url_of(name)} ends before byte {end} (it holds fewer bytes than its index says); "
                            "write the shards again with simclr make-shards")
        return data

    def read_text(self, name: str) -> str:
        return self.read(name).decode()

    def write(self, name: str, data: bytes) -> None:
        """Object ``name`` holds ``data`` (an object store writes a whole object at once: a reader
        sees the old one or the new one, never a part)."""
        self._call("write", name, lambda: self.fs.pipe_file(self._path(name), data))

    def exists(self, name: str) -> bool:
        return self._call("look for", name, lambda: self.fs.exists(self._path(name)))

    def sizes(self) -> dict[str, int]:
        """The size of each object directly under the root, from one listing (empty when there is none)."""
        def listing() -> dict[str, int]:
            try:
                entries = self.fs.ls(self.root, detail=True, refresh=True)
            except FileNotFoundError:
                return {}
            return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0) for entry in entries
                    if entry.get("type", "file") == "file"}
        return self._call("list", "", listing)
