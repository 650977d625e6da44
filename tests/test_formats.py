"""Data as users hold it: unlabeled folders, STL-10 binary, CIFAR python folders, tar shards."""

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import build_eval_batches, build_loader
from data_pipeline.arrays import ArraySource
from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.image_files import FileSource
from data_pipeline.layouts import open_source
from data_pipeline.shards import ShardSource, make_shards
from data_pipeline.sources import DataError, labelled_indices
from data_pipeline.torchvision_loader import decode_sample
from tests.dataset_layouts import write_cifar, write_stl10, write_unlabeled_folder
from tests.helpers.runs import BAD_FILES, PY, REPO, corrupt_copy, tiny_overrides

CPU = torch.device("cpu")
BACKENDS = ["torchvision", "dali"]


def data_cfg(root, backend="torchvision", **kw) -> DataConfig:
    return DataConfig(root=str(root), backend=backend, image_size=24, batch_size=kw.pop("batch_size", 8),
                      num_workers=kw.pop("num_workers", 1), **kw)


def all_batches(cfg: DataConfig, rank=0, world=1, epoch=0, start=0):
    loader = build_loader(cfg, 0, rank, world, CPU)
    loader.set_epoch(epoch, start)
    return loader, list(loader)


# ---------------------------------------------------------------- unlabeled folders


def test_flat_unlabeled_folder_pretrains_on_both_backends(tmp_path):
    from PIL import Image

    x = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.{'jpg' if i % 2 else 'png'}")  # mixed extensions
    source = open_source(tmp_path)
    assert isinstance(source, FileSource) and len(source) == 20 and source.classes == []
    assert set(source.labels) == {-1}
    for backend in BACKENDS:
        loader, batches = all_batches(data_cfg(tmp_path, backend))
        assert loader.steps_per_epoch == len(batches) == 2
        assert batches[0][0][0].shape == (2, 8, 3, 24, 24) and batches[0][1].tolist() == [-1] * 8


def test_nested_unlabeled_tree_with_grayscale_and_rgba_pngs(tmp_path):
    paths = write_unlabeled_folder(tmp_path / "photos")
    with pytest.raises(DataError, match="outside the class folders.*data.labels=none"):
        open_source(tmp_path / "photos")  # auto: sub-folders beside images are ambiguous
    source = open_source(tmp_path / "photos", labels="none")
    assert sorted(source.paths) == sorted(paths) and set(source.labels) == {-1}
    gray = next(i for i, p in enumerate(source.paths) if p.parent.name == "may")
    rgba = next(i for i, p in enumerate(source.paths) if p.suffix == ".PNG")
    for i in (gray, rgba):
        assert decode_sample(source, i).shape == (3, 32, 32)
    g = decode_sample(source, gray)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grayscale: three equal channels
    cfg = data_cfg(tmp_path / "photos", labels="none", batch_size=len(paths))
    images = {}
    for backend in BACKENDS:
        cfg.backend = backend
        (imgs, labels), = build_eval_batches(cfg, source, CPU, len(paths))
        assert imgs.shape == (len(paths), 3, 24, 24) and labels.tolist() == [-1] * len(paths)
        images[backend] = imgs
        assert len(list(build_loader(cfg, 0, 0, 1, CPU))) == 1
    # the same pictures on both backends (resampling differs slightly)
    assert (images["dali"] - images["torchvision"]).abs().mean() < 0.1


def test_what_needs_labels_says_so_at_start(tmp_path, photo_data):
    from trainer.config import load_config
    from trainer.run.parts import build_parts
    from trainer.runtime.distributed import DistInfo

    write_unlabeled_folder(tmp_path / "photos")
    over = tiny_overrides(tmp_path / "photos", tmp_path / "run", **{"data.labels": "none", "train.knn_every_epochs": 1,
                                                                     "data.val_root": str(photo_data / "val")})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
    with pytest.raises(DataError, match="kNN monitor.*no labels"):
        build_parts(load_config(None, over), info)
    with pytest.raises(DataError, match="linear probe.*no labels"):
        labelled_indices(open_source(tmp_path / "photos", labels="none"), "the linear probe")


def test_eval_of_an_unlabeled_set_is_one_clear_line(tmp_path, photo_data):
    from trainer.config import load_config
    from trainer.run.loop import train

    write_unlabeled_folder(tmp_path / "photos")
    (tmp_path / "flat").mkdir()
    for p in (tmp_path / "photos").glob("*.jpg"):
        os.link(p, tmp_path / "flat" / p.name)
    over = tiny_overrides(photo_data / "train", tmp_path / "run", **{"train.epochs": 1, "tracking.enabled": "false"})
    checkpoint = train(load_config(None, over)).encoder_path
    proc = subprocess.run([PY, "-m", "launch", "eval", "--checkpoint", str(checkpoint), "--train-data",
                           str(tmp_path / "flat"), "--val-data", str(photo_data / "val"), "--probe-epochs", "1",
                           "--workers", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "has no labels" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- STL-10 and CIFAR as downloaded


def test_stl10_binary_splits_read_in_place(tmp_path):
    root = tmp_path / "stl10_binary"
    written = write_stl10(root)
    for split in ("train", "test", "unlabeled"):
        source = open_source(root, split)
        x, y = written[split]
        assert isinstance(source, ArraySource) and len(source) == len(x)
        assert all(np.array_equal(source.images[i], x[i]) for i in range(len(x)))  # column-major undone
        assert source.labels.tolist() == (y.tolist() if y is not None else [-1] * len(x))
    both = open_source(root, "train+unlabeled")
    assert len(both) == len(written["train"][0]) + len(written["unlabeled"][0])
    assert np.array_equal(both.images[len(written["train"][0])], written["unlabeled"][0][0])
    assert both.classes[0] == "astronaut" and len(labelled_indices(both, "x")) == len(written["train"][0])
    with pytest.raises(DataError, match="STL-10.*data.split.*unlabeled, train\\+unlabeled"):
        open_source(root)
    with open(root / "test_X.bin", "r+b") as f:
        f.truncate(96 * 96 * 3 + 5)
    with pytest.raises(DataError, match="test_X.bin.*truncated"):
        open_source(root, "test")


def test_stl10_trains_on_both_backends(tmp_path):
    root = tmp_path / "stl10_binary"
    write_stl10(root)
    for backend in BACKENDS:
        loader, batches = all_batches(data_cfg(root, backend, split="train+unlabeled"), rank=1, world=2)
        assert len(batches) == loader.steps_per_epoch == (50 // 2) // 4
        assert batches[0][0][0].shape == (2, 4, 3, 24, 24)


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_python_folders(tmp_path, hundred):
    root = tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    written = write_cifar(root, hundred)
    for split in ("train", "test"):
        source = open_source(root, split)
        x, y = written[split]
        assert len(source) == len(x) and source.labels.tolist() == y.tolist()
        assert all(np.array_equal(source.images[i], x[i]) for i in range(len(x)))
        assert source.classes == written["classes"]
    with pytest.raises(DataError, match="CIFAR.*train or test"):
        open_source(root, "unlabeled")
    for backend in BACKENDS:
        _, batches = all_batches(data_cfg(root, backend, split="train"))
        assert len(batches) == len(written["train"][0]) // 8


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR batch.*refusing"):
        open_source(root, "test")
    assert not (tmp_path / "pwned").exists()


def test_split_on_a_set_without_splits_is_refused(photo_data):
    with pytest.raises(DataError, match="data.split='train' applies to STL-10 and CIFAR"):
        open_source(photo_data / "train", "train")


# ---------------------------------------------------------------- tar shards


def colour_coded(tmp_path, n=60):
    """An npz whose image i is one flat colour that encodes its label: what a loader yields can be
    matched to the label it reports (JPEG keeps flat colours to within a few levels)."""
    y = np.arange(n) % 10
    x = np.repeat((20 + 20 * y).astype(np.uint8)[:, None, None, None], 32 * 32 * 3).reshape(n, 32, 32, 3)
    np.savez(tmp_path / "coded.npz", x=x, y=y)
    return tmp_path / "coded.npz"


def no_colour_change() -> AugmentConfig:
    return AugmentConfig(jitter_prob=0, grayscale_prob=0, blur_prob=0, mean=(0, 0, 0), std=(1, 1, 1))


def test_make_shards_layout_manifest_and_index(tmp_path, photo_data):
    out = tmp_path / "shards"
    proc = subprocess.run([PY, "-m", "launch", "make-shards", str(photo_data / "train"), str(out), "--shard-size",
                           "16"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{k:06d}.tar" for k in range(5)]
    assert manifest["samples"] == 80 and len(manifest["classes"]) == 10
    import tarfile

    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.jpg", "000000000.cls"]  # WebDataset: <key>.jpg + <key>.cls
        label = int(tar.extractfile(names[1]).read())
    source = open_source(out)
    assert isinstance(source, ShardSource) and len(source) == 80 and source.labels[0] == label
    folder = open_source(photo_data / "train")
    assert sorted(np.bincount(source.labels)) == sorted(np.bincount(folder.labels))
    with tarfile.open(out / "shard-000000.tar") as tar:  # the index's offsets point at the image bytes
        assert tar.extractfile(names[0]).read() == open(out / "shard-000000.tar", "rb").read()[
            source.offsets[0] : source.offsets[0] + source.sizes[0]]
    again = subprocess.run([PY, "-m", "launch", "make-shards", str(photo_data / "train"), str(out)],
                           cwd=REPO, capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr and "Traceback" not in again.stderr


def test_make_shards_refuses_corrupt_files_and_unlabeled_sets_have_no_cls(tmp_path, photo_data):
    bad, _ = corrupt_copy(photo_data, tmp_path, "astronaut", 0, b"")
    with pytest.raises(DataError, match="cannot be decoded.*--skip-corrupt"):
        make_shards(open_source(bad), tmp_path / "s1", 10)
    manifest = make_shards(open_source(bad), tmp_path / "s1", 10, skip_corrupt=True)
    assert manifest["samples"] == 79
    write_stl10(tmp_path / "stl10_binary")
    manifest = make_shards(open_source(tmp_path / "stl10_binary", "unlabeled"), tmp_path / "s2", 6)
    assert manifest["classes"] == [] and "labels" not in manifest["shards"][0]
    assert (tmp_path / "s2" / "shard-000000.idx").read_text().count("cls") == 0
    assert set(open_source(tmp_path / "s2").labels) == {-1}


def test_a_damaged_shard_set_is_named(tmp_path, photo_data):
    make_shards(open_source(photo_data / "train"), tmp_path / "s", 30)
    with open(tmp_path / "s" / "shard-000001.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="shard-000001.tar is 1000 bytes, the manifest says.*copy it again"):
        open_source(tmp_path / "s")
    (tmp_path / "s" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="shard-000001.tar listed in .*manifest.json is missing"):
        open_source(tmp_path / "s")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_split_over_ranks_with_equal_steps_and_exact_labels(tmp_path, backend):
    make_shards(open_source(colour_coded(tmp_path)), tmp_path / "s", 7)  # 60 samples in 9 shards
    source = open_source(tmp_path / "s")
    cfg = data_cfg(tmp_path / "s", backend, augment=no_colour_change(), batch_size=8)
    seen, steps = [], set()
    for rank in range(2):
        loader, batches = all_batches(cfg, rank, 2, epoch=3)
        steps.add((loader.steps_per_epoch, len(batches)))
        for (pair,), labels in batches:
            colour = pair[0].mean(dim=(1, 2, 3)) * 255  # each image is flat: its mean is its colour
            assert torch.allclose(colour, 20 + 20 * labels.float(), atol=4), (colour, labels)
            seen.append(labels)
        shards_read = set(source.shard_of[loader.indices()])
        assert len(shards_read) <= 6  # a rank reads its own block of shards, not all 9
    assert steps == {(7, 7)}  # 60 // 2 ranks // 4 per rank
    assert len(torch.cat(seen)) == 56


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_resume_mid_epoch_at_the_same_samples(tmp_path, backend):
    make_shards(open_source(colour_coded(tmp_path)), tmp_path / "s", 7)
    cfg = data_cfg(tmp_path / "s", backend, augment=no_colour_change(), batch_size=8)
    _, whole = all_batches(cfg, 1, 2, epoch=2)
    _, resumed = all_batches(cfg, 1, 2, epoch=2, start=3)
    assert len(resumed) == len(whole) - 3
    for a, b in zip(whole[3:], resumed):
        assert torch.equal(a[1], b[1])
        if backend == "torchvision":  # bitwise: per-sample seeds (DALI draws fresh augmentations)
            assert torch.equal(a[0][0], b[0][0])
        assert torch.allclose(b[0][0][0].mean(dim=(1, 2, 3)) * 255, 20 + 20 * b[1].float(), atol=4)


def test_file_checks_are_kept_with_the_index_for_a_restart(tmp_path, photo_data, monkeypatch):
    """A restart reads no file again and still knows the bad one; a folder that changed has its
    files (only its files) checked again."""
    import data_pipeline.file_checks as file_checks

    tree, bad = corrupt_copy(photo_data, tmp_path, "chelsea", 1, b"")
    calls = []
    real = file_checks.check_image_file
    monkeypatch.setattr(file_checks, "check_image_file", lambda path: calls.append(Path(path)) or real(path))

    def start() -> int:
        cfg = DataConfig(root=str(tree), backend="torchvision", batch_size=8, skip_corrupt=True)
        loader = build_loader(cfg, 0, 0, 1, CPU, index_folder=tmp_path / "run")
        loader.check_files()
        return loader.corrupt_skipped

    assert start() == 1 and len(calls) == 80
    calls.clear()
    assert start() == 1 and calls == []
    coffee = tree / "coffee"
    shutil.copy(next(coffee.iterdir()), coffee / "zz_new.jpg")
    assert start() == 1 and sorted(calls) == sorted(coffee.iterdir())  # that folder alone, its new file included


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_gloo_ranks_pretrain_on_shards(tmp_path, photo_data, backend):
    make_shards(open_source(photo_data / "train"), tmp_path / "shards", 16)
    over = tiny_overrides(tmp_path / "shards", tmp_path / "run", **{"data.backend": backend, "train.epochs": 1,
                                                                     "data.num_workers": 1})
    proc = subprocess.run([PY, "-m", "launch", "train", "--nproc", "2", *over], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and np.isfinite(rows[-1]["train/loss"])  # 80 images, batch 8: 10 steps
    assert (tmp_path / "run" / "encoder.pt").exists()


def test_data_formats_benchmark_writes_its_table(tmp_path, photo_data):
    out = tmp_path / "formats.json"
    proc = subprocess.run([PY, "-m", "benchmarks.data_formats", "--data", str(photo_data / "train"), "--shard-size",
                           "16", "--batch", "8", "--batches", "2", "--rounds", "1", "--workers", "1", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["images"] == 80 and result["shards"] == 5 and len(result["git_commit"]) == 40
    assert result["start_up"]["folder_first_start"]["files"] == 80 and result["start_up"]["shards_start"]["files"] == 5
    assert all(v > 0 for v in result["images_per_s"].values())
    assert "folder_restart" in proc.stdout and "shards_dali" in proc.stdout


def test_reading_many_shards_keeps_few_files_open(tmp_path, photo_data):
    from data_pipeline import shards

    make_shards(open_source(photo_data / "train"), tmp_path / "s", 2)  # 40 tars
    source = open_source(tmp_path / "s")
    fds_before = len(os.listdir("/proc/self/fd"))
    whole = [source.read_encoded(i) for i in range(len(source))]
    assert len(os.listdir("/proc/self/fd")) - fds_before <= shards.MAX_OPEN_TARS
    assert whole[0][:3] == b"\xff\xd8\xff" and all(len(b) == s for b, s in zip(whole, source.sizes))


def test_a_damaged_shard_member_says_to_write_the_shards_again(tmp_path):
    """'Delete or replace it' is no advice for an image inside a tar."""
    from data_pipeline.torchvision_loader import decode_sample

    make_shards(open_source(colour_coded(tmp_path)), tmp_path / "s", 30)
    source = open_source(tmp_path / "s")
    tar = tmp_path / "s" / source.shards[source.shard_of[0]]
    with open(tar, "r+b") as f:  # the first member's bytes overwritten in place: same length, not a JPEG
        f.seek(int(source.offsets[0]))
        f.write(b"\0" * int(source.sizes[0]))
    with pytest.raises(DataError, match="write the shards again.*data.skip_corrupt") as info:
        decode_sample(source, 0)
    assert "delete or replace" not in str(info.value)


def test_an_unreadable_class_folder_is_named_as_such(photo_data, monkeypatch):
    import os

    from data_pipeline import image_files

    locked = sorted((photo_data / "train").iterdir())[3]
    real = os.access
    monkeypatch.setattr(image_files.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    with pytest.raises(DataError, match=f"class folder {locked} cannot be read.*permissions"):
        open_source(photo_data / "train")


def test_one_corrupt_image_policy_on_both_backends(photo_data, tmp_path):
    """A corrupt sample is read as the next good one, image and label, and ``corrupt_skipped`` counts
    the distinct corrupt samples of the dataset: equal counts and labels on both backends."""
    first_class = sorted(p.name for p in (photo_data / "train").iterdir())[0]
    # the last image of a class: the next good sample is the first of the next class, with another label
    root, bad = corrupt_copy(photo_data, tmp_path, first_class, -1, BAD_FILES["truncated_jpeg"])
    source = open_source(root)
    bad_index = source.paths.index(bad)
    assert source.labels[bad_index + 1] != source.labels[bad_index]
    seen = {}
    for backend in BACKENDS:
        cfg = DataConfig(root=str(root), backend=backend, image_size=16, batch_size=16, num_workers=1,
                         skip_corrupt=True, augment=AugmentConfig(blur_prob=0.0))
        loader = build_loader(cfg, 0, 0, 1, CPU)
        labels, counts = [], []
        for epoch in range(2):  # 5 batches of 16: every sample once per epoch
            loader.set_epoch(epoch)
            labels.append(torch.cat([batch[1] for batch in loader]).tolist())
            counts.append(loader.corrupt_skipped)
            position = int(np.flatnonzero(loader.indices() == bad_index)[0])
            assert labels[-1][position] == source.labels[bad_index + 1], backend  # the replacement's label
        seen[backend] = labels, counts
    assert seen["torchvision"] == seen["dali"]
    assert seen["dali"][1] == [1, 1]  # one corrupt image in the dataset, not one more per epoch
