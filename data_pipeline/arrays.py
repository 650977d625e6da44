"""Decoded images kept in arrays: an ``.npz``, STL-10's binary folder (memory-mapped in place), and
torchvision's CIFAR-10/100 python folders (unpickled safely)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from data_pipeline.sources import DataError, Source


class ImageArrays:
    """N x H x W x 3 uint8 images kept in one or more arrays (memory-mapped files stay on disk),
    indexed as one sequence: ``images[i]`` is image i, HWC, contiguous."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return np.ascontiguousarray(self.parts[part][index - self.offsets[part]])  # DALI takes dense arrays only

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` as one dense len(indices) x H x W x 3 array (fancy indexing per part)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(self.parts) == 1:
            return np.ascontiguousarray(self.parts[0][indices])
        out = np.empty((len(indices), *self.parts[0].shape[1:]), dtype=self.parts[0].dtype)
        part_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for k, part in enumerate(self.parts):
            mine = part_of == k
            out[mine] = part[indices[mine] - self.offsets[k]]
        return out


class ArraySource(Source):
    """Decoded images in arrays (``Source``): an ``.npz``, STL-10 or CIFAR."""

    stored = "decoded"
    damaged_fix = "check the array file"
    file_count = 1

    def __init__(self, path: Path, images: ImageArrays, labels: np.ndarray, classes: list[str] | None = None) -> None:
        self.location, self.images = path, images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes or []

    def __len__(self) -> int:
        return len(self.images)

    def sample_name(self, index: int) -> str:
        return f"{self.location}[{index}]"

    def read_decoded(self, indices: np.ndarray) -> np.ndarray:
        return self.images.take(indices)



def load_npz(path: str | Path) -> ArraySource:
    """An ``.npz`` with ``x`` (uint8, N x H x W x 3) and ``y`` (integer labels, N; -1 = unlabeled)."""
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
    return ArraySource(path, ImageArrays([x]), y.astype(np.int64), [str(c) for c in np.unique(y[y >= 0])])


# STL-10 binary: 96x96x3 uint8 per image, each channel stored column-major; labels 1..10, one byte each.
STL10_SIDE = 96
STL10_SPLITS = {"train": ("train",), "test": ("test",), "unlabeled": ("unlabeled",),
                "train+unlabeled": ("train", "unlabeled")}


def is_stl10(root: Path) -> bool:
    return root.is_dir() and any((root / f"{name}_X.bin").is_file() for name in ("train", "test", "unlabeled"))


def load_stl10(root: Path, split: str) -> ArraySource:
    """STL-10 as its binary folder holds it (``stl10_binary/``), read in place through memory maps."""
    if split not in STL10_SPLITS:
        raise DataError(f"{root} is an STL-10 binary folder: set data.split to one of {', '.join(STL10_SPLITS)} "
                        f"(got {split!r})")
    image_bytes = 3 * STL10_SIDE * STL10_SIDE
    parts, labels = [], []
    for name in STL10_SPLITS[split]:
        x_file = root / f"{name}_X.bin"
        if not x_file.is_file():
            raise DataError(f"STL-10 split {name!r} needs {x_file}, which is missing; check the download")
        size = x_file.stat().st_size
        if size == 0 or size % image_bytes:
            raise DataError(f"{x_file} is {size} bytes, not a whole number of 96x96x3 images ({image_bytes} bytes "
                            "each): the file is truncated; download it again")
        n = size // image_bytes
        # (N, C, W, H) on disk, column-major per channel: transposed to N x H x W x C without a copy
        parts.append(np.memmap(x_file, np.uint8, "r", shape=(n, 3, STL10_SIDE, STL10_SIDE)).transpose(0, 3, 2, 1))
        if name == "unlabeled":
            labels.append(np.full(n, -1, np.int64))
            continue
        y_file = root / f"{name}_y.bin"
        if not y_file.is_file():
            raise DataError(f"STL-10 split {name!r} needs its labels {y_file}, which is missing")
        y = np.fromfile(y_file, np.uint8).astype(np.int64) - 1
        if len(y) != n or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise DataError(f"{y_file} holds {len(y)} labels (1..10 expected) for {n} images in {x_file}; "
                            "one of the two files is damaged: download them again")
        labels.append(y)
    names_file = root / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else [str(i) for i in range(10)]
    return ArraySource(root, ImageArrays(parts), np.concatenate(labels), classes)


# torchvision's CIFAR python folders: pickled dicts of N x 3072 uint8 rows (CHW, row-major) and labels
CIFAR_LAYOUTS = {
    "batches.meta": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                     "labels": "labels", "names": "label_names"},  # CIFAR-10
    "meta": {"train": ["train"], "test": ["test"], "labels": "fine_labels", "names": "fine_label_names"},  # -100
}


def cifar_layout(root: Path) -> dict | None:
    for meta, layout in CIFAR_LAYOUTS.items():
        if root.is_dir() and (root / meta).is_file() and (root / layout["test"][0]).exists():
            return {**layout, "meta": meta}
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle can run code, this one cannot."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing from the CIFAR folder {path.parent}; check the download")
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a readable CIFAR batch ({exc}); download the python version again") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not a CIFAR batch (a dict of 'data' and labels); "
                        "download the python version again")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in content.items()}


def load_cifar(root: Path, split: str, layout: dict) -> ArraySource:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) as torchvision keeps it."""
    if split not in ("train", "test"):
        raise DataError(f"{root} is a CIFAR python folder: set data.split to train or test (got {split!r})")
    xs, ys = [], []
    for name in layout[split]:
        batch = _read_cifar_pickle(root / name)
        missing = [k for k in ("data", layout["labels"]) if k not in batch]
        if missing:
            raise DataError(f"{root / name} has no {' or '.join(repr(k) for k in missing)} entry; it is not a CIFAR "
                            "python batch (download the python version again)")
        data, labels = np.asarray(batch["data"]), np.asarray(batch[layout["labels"]], np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"{root / name} does not hold N x 3072 uint8 'data' with N '{layout['labels']}'; "
                            "it is not a CIFAR python batch")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    names = _read_cifar_pickle(root / layout["meta"]).get(layout["names"], [])
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ArraySource(root, ImageArrays([np.ascontiguousarray(np.concatenate(xs))]), np.concatenate(ys), classes)
