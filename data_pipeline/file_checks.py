"""Cheap checks of image files before a decoder sees them (DALI's decoder can take the process
down on a corrupt file). The verdicts are kept per folder in the tree index
(``data_pipeline.tree_index``), so that a restarted job re-reads only the files of changed folders."""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG": "png", b"BM": "bmp", b"RIFF": "webp"}
# Decoding allocates width x height x 3 bytes whatever the file's size: a 1 MB PNG of 20000 x 20000
# took 1.2 GB. 2**27 pixels (134 megapixels, a 400 MB decode) passes any camera's photo.
MAX_IMAGE_PIXELS = 2**27
HEAD_BYTES = 4096  # one read: the magic and, for every format but a JPEG with a large EXIF block, the size
_JPEG_FRAMES = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}


def image_dimensions(kind: str, head: bytes, fd: int | None = None) -> tuple[int, int] | None:
    """(width, height) from an image's header, without decoding; None when it cannot be told. A
    JPEG's frame header follows its APP blocks: past ``head``, a few more reads of ``fd`` find it."""
    try:
        if kind == "png" and len(head) >= 24:
            return struct.unpack(">II", head[16:24])
        if kind == "bmp" and len(head) >= 26:
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)
        if kind == "webp" and len(head) >= 30:
            chunk = head[12:16]
            if chunk == b"VP8X":
                return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", head[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(head[21:25], "little")
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if kind == "jpeg":
            return _jpeg_dimensions(head, fd)
    except struct.error:
        return None
    return None


def encoded_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an encoded image held in memory; None when its header does not tell."""
    kind = next((k for m, k in _MAGIC.items() if data.startswith(m)), None)
    return image_dimensions(kind, data) if kind else None


def _jpeg_dimensions(head: bytes, fd: int | None, extra_reads: int = 3) -> tuple[int, int] | None:
    buf, base, i = head, 0, 2  # buf holds the file's bytes from offset base
    while True:
        if i + 9 > base + len(buf):  # the next marker lies past what was read
            if fd is None or extra_reads == 0:
                return None
            extra_reads -= 1
            buf, base = os.pread(fd, 65536, i), i
            if len(buf) < 9:
                return None
        at = i - base
        if buf[at] != 0xFF:
            return None
        marker = buf[at + 1]
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", buf[at + 5:at + 9])
            return width, height
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        i += 2 + struct.unpack(">H", buf[at + 2:at + 4])[0]


def check_image_file(path: Path | str) -> str | None:
    """Cheap structural check (magic bytes; a JPEG end marker near the end): None if plausible,
    else what is wrong. Catches non-image and truncated files without decoding them. Plain
    ``os.open``/``read``/``lseek``: Python's ``open`` adds two ``fstat`` calls a file, which a
    network file system serves too."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.read(fd, HEAD_BYTES)
            size = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, max(0, size - 1024), os.SEEK_SET)
            tail = os.read(fd, 1024)
            kind = next((k for m, k in _MAGIC.items() if head.startswith(m)), None)
            dims = image_dimensions(kind, head, fd) if kind else None
        finally:
            os.close(fd)
    except OSError as exc:
        return f"unreadable ({exc})"
    if size == 0:
        return "it is empty (0 bytes)"
    if kind is None:
        return "not a JPEG/PNG/BMP/WebP image"
    if kind == "webp" and head[12:16] == b"VP8X" and len(head) > 20 and head[20] & 0x02:  # VP8X's animation flag
        return "an animated WebP (the decoders read still images; convert it to one, e.g. its first frame)"
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if dims is not None and dims[0] * dims[1] > MAX_IMAGE_PIXELS:
        return (f"too large to decode safely: {dims[0]} x {dims[1]} pixels ({dims[0] * dims[1] / 1e6:.0f} megapixels, "
                f"over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f}; a decompression bomb?)")
    return None


def find_corrupt_images(paths: list[Path], workers: int = 16) -> dict[Path, str]:
    """{path: problem} over ``paths``, checked in parallel threads (I/O bound)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(check_image_file, paths, chunksize=256))
    return {p: why for p, why in zip(paths, problems) if why}
