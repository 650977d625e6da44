"""Small datasets in exactly the on-disk layouts users download (STL-10 binary, torchvision's CIFAR
python folders, an unlabeled photo folder), made from the photos that ship with installed packages."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.sample_data import make_photo_crops


def write_stl10(root: Path, train_per_class: int = 3, test_per_class: int = 2, unlabeled: int = 20) -> dict:
    """``stl10_binary/``: {train,test}_X.bin (96x96x3, each channel column-major), {train,test}_y.bin
    (labels 1..10, one byte), unlabeled_X.bin, class_names.txt. Returns the arrays written (HWC)."""
    crops = make_photo_crops(96, train_per_class + unlabeled, test_per_class, seed=3)
    x, y, classes = crops["train"]
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(x))
    unl, lab = pick[:unlabeled], pick[unlabeled:]
    lab = lab[np.argsort(y[lab], kind="stable")][: train_per_class * len(classes)]
    arrays = {"train": (x[lab], y[lab]), "test": crops["val"][:2], "unlabeled": (x[unl], None)}
    root.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in arrays.items():
        images.transpose(0, 3, 2, 1).tofile(root / f"{name}_X.bin")  # N x C x W x H: column-major per channel
        if labels is not None:
            (labels + 1).astype(np.uint8).tofile(root / f"{name}_y.bin")
    (root / "class_names.txt").write_text("\n".join(classes) + "\n")
    return arrays


def write_cifar(root: Path, hundred: bool = False, per_class: int = 2) -> dict:
    """torchvision's ``cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta) or
    ``cifar-100-python`` (train, test, meta): pickled dicts with bytes keys, as the real files load."""
    crops = make_photo_crops(32, 5 * per_class, per_class, seed=4)
    root.mkdir(parents=True, exist_ok=True)

    def dump(name: str, content: dict) -> None:
        with open(root / name, "wb") as f:
            pickle.dump(content, f, protocol=2)

    def rows(x: np.ndarray) -> np.ndarray:
        return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # CHW, row-major

    x, y, classes = crops["train"]
    key = b"fine_labels" if hundred else b"labels"
    if hundred:
        dump("train", {b"data": rows(x), key: y.tolist(), b"coarse_labels": (y // 2).tolist()})
        dump("meta", {b"fine_label_names": [c.encode() for c in classes]})
        test = "test"
    else:
        for b, part in enumerate(np.array_split(np.arange(len(x)), 5), 1):
            dump(f"data_batch_{b}", {b"batch_label": b"training batch", b"data": rows(x[part]),
                                     key: y[part].tolist(), b"filenames": [b"f.png"] * len(part)})
        dump("batches.meta", {b"label_names": [c.encode() for c in classes], b"num_vis": 3072})
        test = "test_batch"
    vx, vy, _ = crops["val"]
    dump(test, {b"data": rows(vx), key: vy.tolist()})
    return {"train": (x, y), "test": (vx, vy), "classes": classes}


def write_unlabeled_folder(root: Path, count: int = 24) -> list[Path]:
    """Photos with no classes: JPEGs at the top, PNGs (grayscale and RGBA) nested two levels down."""
    x, _, _ = make_photo_crops(32, count, 1, seed=5)["train"]
    x = x[np.random.default_rng(1).permutation(len(x))[:count]]
    paths = []
    for i, image in enumerate(x):
        if i % 3 == 0:
            path, img = root / f"{i:03d}.jpg", Image.fromarray(image)
        elif i % 3 == 1:
            path, img = root / "2024" / "may" / f"{i:03d}.png", Image.fromarray(image).convert("L")
        else:
            path, img = root / "2024" / f"{i:03d}.PNG", Image.fromarray(image).convert("RGBA")
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        paths.append(path)
    return paths
