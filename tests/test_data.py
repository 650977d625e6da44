import numpy as np
import pytest
import torch

from data_pipeline import build_loader, open_source
from data_pipeline.arrays import load_npz
from data_pipeline.augment import blur_kernel_size
from data_pipeline.config import DataConfig
from data_pipeline.image_files import list_image_files
from data_pipeline.sampling import rank_indices
from data_pipeline.sources import DataError
from tests.helpers.runs import BAD_FILES, corrupt_copy


def cfg(root, **kw):
    return DataConfig(root=str(root), backend="torchvision", image_size=24, batch_size=8, num_workers=0, **kw)


def test_two_views_shapes_labels_normalisation(photo_data):
    loader = build_loader(cfg(photo_data / "train"), seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    (views,), y = next(iter(loader))  # one size group: SimCLR's two views
    v1, v2 = views
    assert v1.shape == v2.shape == (8, 3, 24, 24) and v1.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))
    assert not torch.equal(v1, v2)  # independently augmented
    assert -3 < v1.mean().item() < 3 and v1.min() < 0 < v1.max()  # normalised, not [0, 1]
    assert loader.steps_per_epoch == 80 // 8


def test_npz_source_matches_folder_labels(photo_data):
    arr = load_npz(photo_data / "train.npz")
    folder = list_image_files(photo_data / "train")
    assert len(arr) == len(folder) == 80 and arr.images.shape[1:] == (32, 32, 3)
    assert sorted(np.bincount(arr.labels)) == sorted(np.bincount(folder.labels))
    loader = build_loader(cfg(photo_data / "train.npz"), 0, 0, 1, torch.device("cpu"))
    assert next(iter(loader))[0][0].shape == (2, 8, 3, 24, 24)


def test_augmentation_is_reproducible_per_seed_epoch_and_position(photo_data):
    def first_batch(seed, epoch, start=0):
        loader = build_loader(cfg(photo_data / "train"), seed, 0, 1, torch.device("cpu"))
        loader.set_epoch(epoch, start)
        return next(iter(loader))[0][0]

    assert torch.equal(first_batch(0, 0), first_batch(0, 0))
    assert not torch.equal(first_batch(0, 0), first_batch(0, 1))
    assert not torch.equal(first_batch(0, 0), first_batch(1, 0))
    loader = build_loader(cfg(photo_data / "train"), 0, 0, 1, torch.device("cpu"))
    it = iter(loader)
    next(it)
    assert torch.equal(next(it)[0][0], first_batch(0, 0, start=1))  # mid-epoch resume position


def test_shards_are_disjoint_equal_and_cover():
    shards = [rank_indices(103, r, 4, seed=3, epoch=2) for r in range(4)]
    assert len({len(s) for s in shards}) == 1
    together = np.concatenate(shards)
    assert len(set(together.tolist())) == len(together) == 100
    assert not np.array_equal(rank_indices(103, 0, 4, 3, 2), rank_indices(103, 0, 4, 3, 3))


def test_missing_and_empty_paths_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        open_source(tmp_path / "empty")
    with pytest.raises(DataError, match="no class sub-folders.*data.labels=none"):
        list_image_files(tmp_path / "empty", labels="folders")
    (tmp_path / "tree" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="cats holds no images"):
        open_source(tmp_path / "tree")
    with pytest.raises(DataError, match="data.root is empty"):
        open_source("")


def test_bad_npz_is_named(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="bad.npz: 'x' must be uint8 N x H x W x 3"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="must hold arrays 'x'"):
        load_npz(tmp_path / "nolabels.npz")


@pytest.mark.parametrize("junk", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_corrupt_image_is_named(photo_data, tmp_path, junk):
    root, bad = corrupt_copy(photo_data, tmp_path, "astronaut", 0, junk)
    loader = build_loader(cfg(root, skip_corrupt=False), 0, 0, 1, torch.device("cpu"))
    loader.set_epoch(0)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        for _ in loader:
            pass


@pytest.mark.parametrize("junk", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_corrupt_image_skipped_and_counted(photo_data, tmp_path, junk):
    root, _ = corrupt_copy(photo_data, tmp_path, "astronaut", 0, junk)
    loader = build_loader(cfg(root, skip_corrupt=True), 0, 0, 1, torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch and all(b[0][0].shape[1] == 8 for b in batches)
    assert loader.corrupt_skipped == 1


def test_batch_must_split_over_ranks_and_fit_the_shard(photo_data):
    with pytest.raises(DataError, match="does not divide over 3 ranks"):
        build_loader(cfg(photo_data / "train"), 0, 0, 3, torch.device("cpu"))
    big = DataConfig(root=str(photo_data / "train"), batch_size=200, backend="torchvision")
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(big, 0, 0, 2, torch.device("cpu"))


def test_blur_kernel_is_odd_and_about_a_tenth():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3 and blur_kernel_size(96) == 9


def test_image_sizes_are_read_from_headers_and_a_bomb_is_named(tmp_path):
    """Every format's size from its header (a JPEG's frame header past a 30 kB EXIF block too),
    and a 20000 x 20000 PNG of a few kB named as too large before any decoder allocates 1.2 GB."""
    import io
    import os

    from PIL import Image

    from data_pipeline.file_checks import check_image_file, image_dimensions
    from tests.helpers.runs import png_header

    for fmt, kind, extra in (("PNG", "png", {}), ("BMP", "bmp", {}), ("WEBP", "webp", {"lossless": True}),
                             ("WEBP", "webp", {"quality": 50}), ("JPEG", "jpeg", {"exif": b"Exif\0\0" + b"x" * 30000})):
        buffer = io.BytesIO()
        Image.new("RGB", (123, 45)).save(buffer, fmt, **extra)
        path = tmp_path / f"image.{kind}"
        path.write_bytes(buffer.getvalue())
        fd = os.open(path, os.O_RDONLY)
        try:
            assert image_dimensions(kind, os.pread(fd, 4096, 0), fd) == (123, 45), (fmt, extra.keys())
        finally:
            os.close(fd)
        assert check_image_file(path) is None
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))
    assert "20000 x 20000 pixels (400 megapixels, over the limit of 134" in check_image_file(bomb)


def test_every_bad_file_is_named_at_the_start_check(photo_data, tmp_path):
    """Round 7, E9: the start-up check named the first bad file and counted the rest; now one pass
    names them (five by path, then how many more)."""
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    victims = sorted(root.rglob("*.jpg"))[:7]
    for victim in victims:
        victim.write_text("not an image")
    loader = build_loader(cfg(root, skip_corrupt=False), 0, 0, 1, torch.device("cpu"))
    with pytest.raises(DataError) as refused:
        loader.check_files()
    said = str(refused.value)
    assert said.startswith(f"cannot decode 7 images in {root}: {victims[0]} (not a JPEG/PNG/BMP/WebP image); "), said
    assert all(str(v) in said for v in victims[:5]) and str(victims[5]) not in said and "; and 2 more;" in said
    assert "delete or replace the damaged file(s)" in said and "data.skip_corrupt=true" in said
