"""A folder of image files, one file per sample: class sub-folders (ImageFolder) or no labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipeline.sampling import rank_indices
from data_pipeline.sources import IMAGE_EXTENSIONS, LABEL_MODES, DataError

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # folders that hold a split, not a class


class FileSource:
    """One image file per sample (``Source``)."""

    stored = "files"
    damaged_fix = "delete or replace it"
    order_depends_on_world_size = False

    def __init__(self, root: Path, paths: list[Path], labels: list[int], classes: list[str]) -> None:
        self.location, self.paths = root, paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def file_count(self) -> int:
        return len(self.paths)

    def sample_name(self, index: int) -> str:
        return str(self.paths[index])

    def read_encoded(self, index: int) -> bytes:
        try:
            return self.paths[index].read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read image {self.paths[index]}: {exc}") from None

    def read_decoded(self, indices: np.ndarray) -> np.ndarray:
        raise TypeError("image files are read encoded (read_encoded)")

    def sample_files(self) -> list[Path]:
        return self.paths

    def epoch_order(self, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
        return rank_indices(len(self), rank, world_size, seed, epoch)

    def reading_order(self, indices: np.ndarray) -> np.ndarray:
        return indices


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
