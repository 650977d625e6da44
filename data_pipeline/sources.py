"""Where images come from, in the layouts users hold them, validated with errors that name the
offending file or folder. Both backends (torchvision, DALI) read through this module.

- a folder of image files: class sub-folders (ImageFolder) or no labels at all (flat or nested);
- arrays: an ``.npz``, STL-10's binary folder, torchvision's CIFAR-10/100 python folders;
- WebDataset tar shards written by ``simclr make-shards`` (see ``data_pipeline.shards``).

A missing label is -1: pretraining needs none; whatever needs labels asks ``labelled_indices``.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # folders that hold a split, not a class
LABEL_MODES = ("auto", "folders", "none")


class DataError(ValueError):
    """A dataset problem the user must fix (missing path, empty folder, unreadable image)."""


@dataclass
class FileSource:
    """One image file per sample."""

    root: Path
    paths: list[Path]
    labels: list[int]  # -1: unlabeled
    classes: list[str]  # empty when unlabeled

    def __len__(self) -> int:
        return len(self.paths)


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


@dataclass
class ArraySource:
    path: Path
    images: ImageArrays
    labels: np.ndarray  # N int64, -1: unlabeled
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


SHARD_MANIFEST = "manifest.json"  # written last by make-shards: its presence marks a complete set


@dataclass
class ShardSource:
    """WebDataset tar shards (``simclr make-shards``): sample i is ``sizes[i]`` bytes at
    ``offsets[i]`` of tar ``shards[shard_of[i]]``; samples of a shard are consecutive."""

    root: Path
    shards: list[Path]
    shard_of: np.ndarray  # N int32: which shard holds sample i
    offsets: np.ndarray  # N int64: byte offset of the image inside its tar
    sizes: np.ndarray  # N int64
    names: list[str]  # member name of each image inside its tar ("<key>.jpg")
    labels: np.ndarray  # N int64, -1: unlabeled
    classes: list[str]

    def __len__(self) -> int:
        return len(self.offsets)

    def shard_ranges(self) -> np.ndarray:
        """(shards + 1) boundaries: the samples of shard k are ``range(b[k], b[k + 1])``."""
        return np.searchsorted(self.shard_of, np.arange(len(self.shards) + 1))


Source = FileSource | ArraySource | ShardSource


def labelled_indices(source, needed_by: str) -> np.ndarray:
    """Indices of the samples that carry a label; a DataError naming ``needed_by`` when none do."""
    labels = np.asarray(source.labels)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        where = getattr(source, "root", None) or getattr(source, "path", "")
        raise DataError(f"{needed_by} needs labelled images, but {where} has no labels (an unlabeled folder or "
                        "split); point it at a labelled set (class sub-folders, a labelled .npz, STL-10's "
                        "train/test split, a CIFAR folder)")
    return keep


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def list_image_files(root: str | Path, labels: str = "auto") -> FileSource:
    """Image files under ``root``. ``labels``: ``folders`` = one sub-folder per class (ImageFolder);
    ``none`` = every image at any depth, unlabeled; ``auto`` = folders if ``root`` has sub-folders,
    else a flat unlabeled folder."""
    root = Path(root)
    if labels not in LABEL_MODES:
        raise DataError(f"data.labels={labels!r} is not one of {', '.join(LABEL_MODES)}")
    if not root.exists():
        raise DataError(f"data path {root} does not exist; set data.root to an image folder, an .npz file, an "
                        "STL-10 or CIFAR folder, or a folder of tar shards")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; expected an image folder, an .npz file, an STL-10 or "
                        "CIFAR folder, or a folder of tar shards")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if labels == "none" or (labels == "auto" and not class_dirs):
        files = _image_files(root)
        if not files:
            raise DataError(f"data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth")
        return FileSource(root, files, [-1] * len(files), [])
    if not class_dirs:
        raise DataError(f"data folder {root} has no class sub-folders (data.labels=folders); expected "
                        f"{root}/<class>/<image>.jpg, or set data.labels=none to pretrain on its images unlabeled")
    if loose:
        raise DataError(f"{len(loose)} image(s) such as {loose[0]} lie outside the class folders of {root}; they "
                        "would be ignored: move them into a class folder, or set data.labels=none if the "
                        "sub-folders are not classes (every image at any depth is then used, unlabeled)")
    splits = [d for d in class_dirs if d.name.lower() in SPLIT_NAMES and any(c.is_dir() for c in d.iterdir())]
    if splits:
        names = ", ".join(d.name + "/" for d in splits)
        raise DataError(f"data folder {root} holds dataset splits ({names}), not classes: training on it would mix "
                        f"them; point data.root at one split, e.g. data.root={splits[0]}")
    paths: list[Path] = []
    label_list: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        if not os.access(class_dir, os.R_OK | os.X_OK):
            raise DataError(f"class folder {class_dir} cannot be read by this user (permissions); give it read "
                            f"access (chmod -R a+rX {class_dir}) or move it out of {root}")
        files = _image_files(class_dir)
        if not files:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it or add images, or set data.labels=none if the sub-folders are not classes")
        paths.extend(files)
        label_list.extend([label] * len(files))
    return FileSource(root, paths, label_list, [d.name for d in class_dirs])


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


def _cifar_layout(root: Path) -> dict | None:
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
    import json

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


def open_source(root: str | Path, split: str = "", labels: str = "auto") -> Source:
    """The dataset at ``root``, whichever layout it has. ``split`` picks a split of a folder that
    holds several (STL-10, CIFAR); ``labels`` says how to read a folder of image files."""
    if not str(root):
        raise DataError("data.root is empty; point it at an image folder, an .npz file, an STL-10 or CIFAR folder, "
                        "or a folder of tar shards")
    path = root = Path(root).expanduser()
    if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise DataError(f"data path {path} cannot be read by this user (permissions); give it read access "
                        f"(chmod -R a+rX {path}) or copy the data somewhere readable")
    layout = _cifar_layout(path)
    if is_stl10(path):
        return load_stl10(path, split)
    if layout is not None:
        return load_cifar(path, split, layout)
    if is_shard_folder(path):
        source = open_shards(path)
    elif str(root).endswith(".npz"):
        source = load_npz(root)
    else:
        source = list_image_files(root, labels)
    if split:
        raise DataError(f"data.split={split!r} applies to STL-10 and CIFAR folders; {root} holds one set: "
                        "remove data.split (or data.val_split)")
    return source


def read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


MAX_OPEN_TARS = 16  # per process: a rank's workers read a few tars at a time; far below a 1024-fd limit
_open_tars: OrderedDict[Path, int] = OrderedDict()  # tar -> fd, least recently used first
_open_tars_pid = 0


def _tar_fd(tar: Path) -> int:
    """An fd for ``tar`` from a small per-process LRU (pread needs no shared file offset, so forked
    DataLoader workers stay independent; the copies a fork inherits are closed in the child)."""
    import os

    global _open_tars_pid
    if _open_tars_pid != os.getpid():
        for fd in _open_tars.values():
            os.close(fd)
        _open_tars.clear()
        _open_tars_pid = os.getpid()
    if tar in _open_tars:
        _open_tars.move_to_end(tar)
        return _open_tars[tar]
    fd = _open_tars[tar] = os.open(tar, os.O_RDONLY)
    while len(_open_tars) > MAX_OPEN_TARS:
        os.close(_open_tars.popitem(last=False)[1])
    return fd


def sample_name(source: Source, index: int) -> str:
    """Where sample ``index`` lives, for messages: its file, ``shard.tar:member`` or ``array[i]``."""
    if isinstance(source, FileSource):
        return str(source.paths[index])
    if isinstance(source, ShardSource):
        return f"{source.shards[source.shard_of[index]]}:{source.names[index]}"
    return f"{source.path}[{index}]"


def read_encoded(source: FileSource | ShardSource, index: int) -> bytes:
    """The encoded image bytes of sample ``index``: its file, or its slice of a tar shard."""
    import os

    if isinstance(source, FileSource):
        return read_file_bytes(source.paths[index])
    tar = source.shards[source.shard_of[index]]
    try:
        data = os.pread(_tar_fd(tar), int(source.sizes[index]), int(source.offsets[index]))
    except OSError as exc:
        raise DataError(f"cannot read {source.names[index]} from shard {tar}: {exc}") from None
    if len(data) != source.sizes[index]:
        raise DataError(f"shard {tar} ends inside {source.names[index]}: the file is cut short; copy it again")
    return data


def rank_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """This rank's sample indices for ``epoch``: one seeded global permutation, cut to a multiple
    of the world size so every rank gets the same count, then strided across ranks (disjoint,
    together covering all but at most world_size-1 samples). Global batch k is the same set of
    samples whatever the world size."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]


def shard_rank_indices(source: ShardSource, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Tar shards in a seeded order, each shard's samples in a seeded order, and rank r reads the
    r-th contiguous block: a rank opens about 1/world of the shards and reads each front to back.
    Unlike ``rank_indices``, a global batch depends on the world size."""
    rng = np.random.default_rng([seed, epoch])
    bounds = source.shard_ranges()
    order = np.concatenate([bounds[k] + rng.permutation(bounds[k + 1] - bounds[k])
                            for k in rng.permutation(len(source.shards))])
    per_rank = len(order) // world_size
    return order[rank * per_rank : (rank + 1) * per_rank]


def epoch_indices(source: Source, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's samples of ``epoch`` in reading order, the same count on every rank."""
    if isinstance(source, ShardSource):
        return shard_rank_indices(source, rank, world_size, seed, epoch)
    return rank_indices(len(source), rank, world_size, seed, epoch)


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


class FileCheckCache:
    """``find_corrupt_images`` with memory: each file's verdict is kept in a JSON file keyed by path,
    size and mtime, so that a restarted job (a requeue) re-reads only files that changed."""

    def __init__(self, path: Path | None) -> None:
        import json

        self.path = path
        self.known: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.known = json.loads(path.read_text())
            except ValueError:  # a damaged cache only costs a full check
                self.known = {}

    def find_corrupt(self, paths: list[Path], workers: int = 16) -> tuple[dict[Path, str], dict[str, list]]:
        """({path: problem} over ``paths``, the entries checked now as {path: [size, mtime_ns, problem]})."""
        import os

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
        import json
        import os

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
