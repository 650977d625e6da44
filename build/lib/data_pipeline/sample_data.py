"""Real photos that ship inside installed packages, turned into small ImageFolder/npz datasets for
the demo and the tests (nothing is downloaded).

"photo crops": ten classes, one per photo (scikit-image and scikit-learn sample images). Training
crops come from the left 70% of each photo and validation crops from the right 30%, so a probe
must recognise unseen parts of a scene, not memorise pixels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

_SKIMAGE = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
            "motorcycle_left.png", "ihc.png"]
_SKLEARN = ["china.jpg", "flower.jpg"]


def photo_paths() -> list[Path]:
    import skimage
    import sklearn

    sk_dir = Path(skimage.__file__).parent / "data"
    sl_dir = Path(sklearn.__file__).parent / "datasets" / "images"
    paths = [sk_dir / n for n in _SKIMAGE] + [sl_dir / n for n in _SKLEARN]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"sample photos not found: {missing}; reinstall scikit-image and scikit-learn")
    return paths


def _random_crops(photo: np.ndarray, count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = photo.shape[:2]
    crops = []
    for _ in range(count):
        side = int(rng.uniform(0.25, 0.6) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
        crops.append(np.asarray(crop))
    return crops


def make_photo_crops(size: int = 64, train_per_class: int = 48, val_per_class: int = 16,
                     seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """{'train': (x, y, classes), 'val': (...)}; x is uint8 N x size x size x 3."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"train": [[], []], "val": [[], []]}
    classes = []
    for label, path in enumerate(photo_paths()):
        photo = np.asarray(Image.open(path).convert("RGB"))
        cut = int(photo.shape[1] * 0.7)
        classes.append(path.stem)
        for split, part, count in (("train", photo[:, :cut], train_per_class), ("val", photo[:, cut:], val_per_class)):
            crops = _random_crops(part, count, size, rng)
            out[split][0].extend(crops)
            out[split][1].extend([label] * count)
    return {k: (np.stack(x), np.array(y, dtype=np.int64), classes) for k, (x, y) in out.items()}


def write_image_folder(root: str | Path, x: np.ndarray, y: np.ndarray, classes: list[str], quality: int = 92) -> Path:
    root = Path(root)
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=quality)
    return root


DEMO_MARKER = ".simclr-demo-data"  # beside the trees make_demo_dataset wrote: the only ones it replaces


def make_demo_dataset(out_dir: str | Path, size: int = 64, train_per_class: int = 48, val_per_class: int = 16,
                      seed: int = 0) -> dict[str, Path]:
    """Write ``out_dir/train`` and ``out_dir/val`` ImageFolder JPEG trees plus ``.npz`` twins,
    replacing what an earlier call wrote there (so each tree matches its npz exactly). Only a tree
    this function wrote (``DEMO_MARKER`` beside it) is ever replaced: anything else is refused,
    untouched."""
    from data_pipeline.sources import DataError

    out_dir = Path(out_dir)
    ours = (out_dir / DEMO_MARKER).exists()
    theirs = [out_dir / name for name in ("train", "val", "train.npz", "val.npz") if (out_dir / name).exists()]
    if theirs and not ours:
        raise DataError(f"{out_dir} already holds {', '.join(p.name for p in theirs)}, which make-demo-data did not "
                        f"write (no {DEMO_MARKER} marker); nothing was changed. Give --out a new or empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).write_text("written by simclr make-demo-data; it may replace train/, val/ and the .npz "
                                       "files here\n")
    paths = {}
    for split, (x, y, classes) in make_photo_crops(size, train_per_class, val_per_class, seed).items():
        shutil.rmtree(out_dir / split, ignore_errors=True)
        paths[split] = write_image_folder(out_dir / split, x, y, classes)
        np.savez(out_dir / f"{split}.npz", x=x, y=y)
    return paths
