"""``open_source``: the dataset at a path, whichever layout it holds (``data_pipeline.sources``)."""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.arrays import cifar_layout, is_stl10, load_cifar, load_npz, load_stl10
from data_pipeline.image_files import list_image_files
from data_pipeline.object_store import RemoteSettings, is_url
from data_pipeline.shards import is_shard_folder, open_shards
from data_pipeline.sources import DataError, Source
from data_pipeline.tree_index import IndexStore


def open_source(root: str | Path, split: str = "", labels: str = "auto", store: IndexStore | None = None,
                remote: RemoteSettings | None = None) -> Source:
    """The dataset at ``root``, whichever layout it has. ``split`` picks a split of a folder that
    holds several (STL-10, CIFAR); ``labels`` says how to read a folder of image files; ``store``:
    where a job keeps an image tree's listing and which rank lists it (a collective when several
    ranks share it: every rank opens the same sources in the same order). A URL (``s3://...``) is
    a shard set in object storage, read as ``remote`` says (the run's ``data`` settings)."""
    if not str(root):
        raise DataError("data.root is empty; point it at an image folder, an .npz file, an STL-10 or CIFAR folder, "
                        "or a folder of tar shards")
    if is_url(root):
        from data_pipeline.remote_shards import open_remote_shards

        if split:
            raise DataError(f"data.split={split!r} applies to STL-10 and CIFAR folders; {root} is a shard set: "
                            "remove data.split (or data.val_split)")
        return open_remote_shards(str(root), remote or RemoteSettings())
    path = Path(root).expanduser()
    if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise DataError(f"data path {path} cannot be read by this user (permissions); give it read access "
                        f"(chmod -R a+rX {path}) or copy the data somewhere readable")
    layout = cifar_layout(path)
    if is_stl10(path):
        return load_stl10(path, split)
    if layout is not None:
        return load_cifar(path, split, layout)
    if is_shard_folder(path):
        source = open_shards(path)
    elif str(path).endswith(".npz"):
        source = load_npz(path)
    else:
        source = list_image_files(path, labels, store)
    if split:
        raise DataError(f"data.split={split!r} applies to STL-10 and CIFAR folders; {path} holds one set: "
                        "remove data.split (or data.val_split)")
    return source
