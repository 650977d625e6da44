"""Cheap checks of image files before a decoder sees them (DALI's decoder can take the process
down on a corrupt file), with a cache so that a restarted job re-reads only changed files."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG": "png", b"BM": "bmp", b"RIFF": "webp"}


def check_image_file(path: Path) -> str | None:
    """Cheap structural check (magic bytes; a JPEG end marker near the end): None if plausible,
    else what is wrong. Catches non-image and truncated files without decoding them."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as exc:
        return f"unreadable ({exc})"
    if size == 0:
        return "it is empty (0 bytes)"
    kind = next((k for m, k in _MAGIC.items() if head.startswith(m)), None)
    if kind is None:
        return "not a JPEG/PNG/BMP/WebP image"
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    return None


def find_corrupt_images(paths: list[Path], workers: int = 16) -> dict[Path, str]:
    """{path: problem} over ``paths``, checked in parallel threads (I/O bound)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(check_image_file, paths, chunksize=256))
    return {p: why for p, why in zip(paths, problems) if why}


class FileCheckCache:
    """``find_corrupt_images`` with memory: each file's verdict is kept in a JSON file keyed by path,
    size and mtime, so that a restarted job (a requeue) re-reads only files that changed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.known = json.loads(path.read_text())
            except ValueError:  # a damaged cache only costs a full check
                self.known = {}

    def find_corrupt(self, paths: list[Path], workers: int = 16) -> tuple[dict[Path, str], dict[str, list]]:
        """({path: problem} over ``paths``, the entries checked now as {path: [size, mtime_ns, problem]})."""
        bad: dict[Path, str] = {}
        stale: list[tuple[Path, os.stat_result | None]] = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                stale.append((p, None))
                continue
            entry = self.known.get(str(p))
            if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
                if entry[2]:
                    bad[p] = entry[2]
            else:
                stale.append((p, st))
        found = find_corrupt_images([p for p, _ in stale], workers)
        checked = {str(p): [st.st_size, st.st_mtime_ns, found.get(p)] for p, st in stale if st is not None}
        bad.update(found)
        return bad, checked

    def save(self, checked: dict[str, list]) -> None:
        """Merge ``checked`` in and write atomically (a crash leaves the previous file)."""
        if self.path is None or not checked:
            return
        self.known.update(checked)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        except OSError:  # a read-only or full disk only costs the next start a full check
            tmp.unlink(missing_ok=True)
