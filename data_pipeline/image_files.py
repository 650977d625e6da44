"""A folder of image files, one file per sample: class sub-folders (ImageFolder) or no labels,
listed once per job by ``data_pipeline.tree_index``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipeline.sources import IMAGE_EXTENSIONS, LABEL_MODES, DataError, Source
from data_pipeline.tree_index import IndexStore, TreeIndex, shared_tree_index
from foundation.logs import get_logger

log = get_logger("data")

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # folders that hold a split, not a class


class FileSource(Source):
    """One image file per sample (``Source``), listed by a ``TreeIndex``: paths are kept relative to
    the root, as strings (a Path per sample costs seconds at ImageNet's size)."""

    stored = "files"
    damaged_fix = "delete or replace the damaged file(s)"

    def __init__(self, root: Path, rels: list[str], labels: list[int], classes: list[str],
                 index: TreeIndex | None = None, store: IndexStore | None = None) -> None:
        self.location, self.rels = root, rels
        self._prefix = "" if str(root) == "." else f"{root}{os.sep}"
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.index, self.store = index, store
        self._paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.rels)

    @property
    def paths(self) -> list[Path]:
        """Each sample's file as a Path (made on first use)."""
        if self._paths is None:
            self._paths = [Path(self._prefix + r) for r in self.rels]
        return self._paths

    @property
    def file_count(self) -> int:
        return len(self.rels)

    def sample_name(self, index: int) -> str:
        return self._prefix + self.rels[index]

    def read_encoded(self, index: int) -> bytes:
        try:
            with open(self.sample_name(index), "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataError(f"cannot read image {self.sample_name(index)}: {exc}") from None

    def sample_files(self) -> list[Path]:
        return self.paths

    def file_checks(self) -> IndexedFileChecks:
        return IndexedFileChecks(self)


class IndexedFileChecks:
    """A file source's check verdicts, kept per folder in its tree index: a restart re-checks only
    the files of folders that changed (without an index, every file, every time)."""

    def __init__(self, source: FileSource) -> None:
        self.source = source

    def pending(self) -> list[int]:
        index = self.source.index
        return list(range(len(self.source))) if index is None else index.unchecked(self.source.rels)

    def known_bad(self) -> dict[int, str]:
        index = self.source.index
        return {} if index is None else index.known_bad(self.source.rels)

    def record(self, checked: list[int], bad: dict[int, str]) -> None:
        """Keep the verdicts (rank 0 writes the index; the other ranks hold it in memory alike)."""
        index, rels = self.source.index, self.source.rels
        if index is None or not checked:
            return
        index.record_checks([rels[i] for i in checked], {rels[i]: why for i, why in bad.items()})
        if self.source.store is not None:
            self.source.store.save(index)


def list_image_files(root: str | Path, labels: str = "auto", store: IndexStore | None = None) -> FileSource:
    """Image files under ``root``. ``labels``: ``folders`` = one sub-folder per class (ImageFolder);
    ``none`` = every image at any depth, unlabeled; ``auto`` = folders if ``root`` has sub-folders,
    else a flat unlabeled folder. ``store``: where the job keeps the listing, and which rank lists
    (``data_pipeline.tree_index``)."""
    root = Path(root)
    if labels not in LABEL_MODES:
        raise DataError(f"data.labels={labels!r} is not one of {', '.join(LABEL_MODES)}")
    if not root.exists():
        raise DataError(f"data path {root} does not exist; set data.root to an image folder, an .npz file, an "
                        "STL-10 or CIFAR folder, or a folder of tar shards")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; expected an image folder, an .npz file, an STL-10 or "
                        "CIFAR folder, or a folder of tar shards")
    index = shared_tree_index(root, store)
    top = index.folders[""]
    class_dirs, loose = top.subdirs, top.files
    for link in top.links:  # a class folder that links back to the root (or above) holds every image again
        target = os.path.realpath(root / link)
        if os.path.realpath(root).startswith(target.rstrip(os.sep) + os.sep) or target == os.path.realpath(root):
            raise DataError(f"class folder {root / link} is a symbolic link to {target}, which holds {root} itself: "
                            f"every image would count again, as class '{link}'; remove the link")
    unread: dict[str, int] = {}
    for folder in index.folders.values():
        for suffix, count in folder.unread.items():
            unread[suffix] = unread.get(suffix, 0) + count
    if unread and (store is None or store.rank == 0):
        said = ", ".join(f"{count} {suffix}" for suffix, count in sorted(unread.items()))
        log.warning(f"{sum(unread.values())} file(s) under {root} are images of formats that are not read "
                 f"({said}) and are left out; convert them to JPEG, PNG or WebP to train on them")
    if labels == "none" or (labels == "auto" and not class_dirs):
        rels = index.walk("", skip_links=True)
        if not rels:
            raise DataError(f"data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth")
        return FileSource(root, rels, [-1] * len(rels), [], index, store)
    if not class_dirs:
        raise DataError(f"data folder {root} has no class sub-folders (data.labels=folders); expected "
                        f"{root}/<class>/<image>.jpg, or set data.labels=none to pretrain on its images unlabeled")
    if loose:
        raise DataError(f"{len(loose)} image(s) such as {root / loose[0]} lie outside the class folders of {root}; "
                        "they would be ignored: move them into a class folder, or set data.labels=none if the "
                        "sub-folders are not classes (every image at any depth is then used, unlabeled)")
    splits = [d for d in class_dirs if d.lower() in SPLIT_NAMES and index.folders[d].subdirs]
    if splits:
        names = ", ".join(d + "/" for d in splits)
        raise DataError(f"data folder {root} holds dataset splits ({names}), not classes: training on it would mix "
                        f"them; point data.root at one split, e.g. data.root={root / splits[0]}")
    rels: list[str] = []
    label_list: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = index.walk(class_dir)
        if not files:
            raise DataError(f"class folder {root / class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it or add images, or set data.labels=none if the sub-folders are not classes")
        rels.extend(files)
        label_list.extend([label] * len(files))
    return FileSource(root, rels, label_list, class_dirs, index, store)
