"""Where images come from: ImageFolder trees and ``.npz`` arrays, validated with errors that name
the offending file or folder. Both backends (torchvision, DALI) read through this module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # folders that hold a split, not a class


class DataError(ValueError):
    """A dataset problem the user must fix (missing path, empty folder, unreadable image)."""


@dataclass
class ImageFolderSource:
    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ArraySource:
    path: Path
    images: np.ndarray  # N x H x W x 3 uint8
    labels: np.ndarray  # N int64
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


Source = ImageFolderSource | ArraySource


def list_image_folder(root: str | Path) -> ImageFolderSource:
    """One sub-folder per class, images inside (searched recursively), classes sorted by name."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path {root} does not exist; set data.root to an ImageFolder tree or an .npz file")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; an ImageFolder tree has one sub-folder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data folder {root} has no class sub-folders; expected {root}/<class>/<image>.jpg")
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:
        raise DataError(f"{len(loose)} image(s) such as {loose[0]} lie outside the class folders of {root}; they "
                        "would be ignored: move them into a class folder or remove them")
    splits = [d for d in class_dirs if d.name.lower() in SPLIT_NAMES and any(c.is_dir() for c in d.iterdir())]
    if splits:
        names = ", ".join(d.name + "/" for d in splits)
        raise DataError(f"data folder {root} holds dataset splits ({names}), not classes: training on it would mix "
                        f"them; point data.root at one split, e.g. data.root={splits[0]}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it or add images")
        paths.extend(files)
        labels.extend([label] * len(files))
    return ImageFolderSource(root, paths, labels, [d.name for d in class_dirs])


def load_npz(path: str | Path) -> ArraySource:
    """An ``.npz`` with ``x`` (uint8, N x H x W x 3) and ``y`` (integer labels, N)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DataError(f"{path} must hold arrays 'x' (N x H x W x 3 uint8) and 'y' (N labels); "
                                f"found {sorted(data.files)}")
            x, y = data["x"], data["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{path}: 'x' must be uint8 N x H x W x 3, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    if len(x) == 0:
        raise DataError(f"{path} holds no images")
    return ArraySource(path, x, y.astype(np.int64), [str(c) for c in np.unique(y)])


def open_source(root: str | Path) -> Source:
    if not str(root):
        raise DataError("data.root is empty; point it at an ImageFolder tree or an .npz file")
    return load_npz(root) if str(root).endswith(".npz") else list_image_folder(root)


def read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """This rank's sample indices for ``epoch``: one seeded global permutation, cut to a multiple
    of the world size so every rank gets the same count, then strided across ranks (disjoint,
    together covering all but at most world_size-1 samples)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]


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
    kind = next((k for m, k in _MAGIC.items() if head.startswith(m)), None)
    if kind is None:
        return "not a JPEG/PNG/BMP/WebP image"
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    return None


def find_corrupt_images(paths: list[Path], workers: int = 16) -> dict[Path, str]:
    """{path: problem} over ``paths``, checked in parallel threads (I/O bound)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(check_image_file, paths, chunksize=256))
    return {p: why for p, why in zip(paths, problems) if why}
