"""The DALI pipeline in CPU mode (device_id=None): the same graph the GPU runs with device='mixed'."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import build_loader
from data_pipeline.config import AugmentConfig, DataConfig
from data_pipeline.sample_data import photo_paths
from data_pipeline.sources import DataError
from tests.helpers.runs import BAD_FILES, corrupt_copy, run_torchrun, tiny_overrides
from trainer.config import load_config

pytest.importorskip("nvidia.dali")
CPU = torch.device("cpu")
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # outputs are pixel / 255
FIXED = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip_prob": 0.0, "jitter_prob": 0.0,
         "grayscale_prob": 0.0, "blur_prob": 0.0, **IDENTITY}


def npz(path, images, labels=None):
    images = np.stack(images).astype(np.uint8)
    np.savez(path, x=images, y=np.arange(len(images)) if labels is None else labels)
    return path


@pytest.fixture(scope="module")
def coord_npz(tmp_path_factory):
    """128x128 images whose red channel is 2x and green channel 2y: crops and flips are readable."""
    yy, xx = np.mgrid[0:128, 0:128]
    img = np.stack([xx * 2, yy * 2, np.full_like(xx, 60)], -1)
    return npz(tmp_path_factory.mktemp("c") / "coord.npz", [img] * 512)


@pytest.fixture(scope="module")
def photo_npz(tmp_path_factory):
    img = np.asarray(Image.open(photo_paths()[0]).convert("RGB").resize((48, 48)))
    return npz(tmp_path_factory.mktemp("p") / "photo.npz", [img] * 512)


def views(root, backend="dali", size=32, batches=4, **aug):
    cfg = DataConfig(root=str(root), backend=backend, image_size=size, batch_size=128, num_workers=2,
                     augment=AugmentConfig(**aug))
    loader = build_loader(cfg, seed=0, rank=0, world_size=1, device=CPU)
    out = []
    for i, ((pair,), _) in enumerate(loader):
        out += list(pair)
        if i + 1 == batches:
            break
    return torch.cat(out)


def test_views_shapes_dtype_layout_normalisation_labels(photo_data):
    cfg = DataConfig(root=str(photo_data / "train"), backend="dali", image_size=24, batch_size=8, num_workers=1)
    dali = build_loader(cfg, 0, 0, 1, CPU)
    tv = build_loader(DataConfig(**{**cfg.__dict__, "backend": "torchvision"}), 0, 0, 1, CPU)
    assert dali.steps_per_epoch == tv.steps_per_epoch == 10
    batches = list(dali)
    assert len(batches) == 10
    (pair,), y = batches[0]
    v1, v2 = pair
    assert v1.shape == v2.shape == (8, 3, 24, 24) and v1.dtype == torch.float32 and v1.is_contiguous()
    assert y.dtype == torch.int64
    assert not torch.equal(v1, v2)
    assert -1.5 < v1.mean().item() < 1.5 and v1.min() < -0.5 and v1.max() > 0.5  # normalised
    # the same sample order (and so labels) as the torchvision backend
    assert [b[1].tolist() for b in batches] == [b[1].tolist() for b in tv]


def test_crop_areas_within_range(coord_npz):
    out = views(coord_npz, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, **IDENTITY)
    r, g = out[:, 0] * 255 / 2, out[:, 1] * 255 / 2  # back to pixel coordinates
    area = ((r.amax((1, 2)) - r.amin((1, 2)) + 1) * (g.amax((1, 2)) - g.amin((1, 2)) + 1)) / 128**2
    assert area.max() <= 1.02 and area.min() >= 0.06
    assert 0.4 < area.mean() < 0.65  # uniform area in [0.08, 1] under the aspect limits
    assert (area < 0.2).float().mean() > 0.05 and (area > 0.75).float().mean() > 0.03


def test_flip_rate(coord_npz):
    out = views(coord_npz, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.5, **IDENTITY)
    flipped = (out[:, 0, :, 0].mean(1) > out[:, 0, :, -1].mean(1)).float().mean().item()
    assert abs(flipped - 0.5) < 0.07


def test_grayscale_rate(coord_npz):
    out = views(coord_npz, jitter_prob=0.0, grayscale_prob=0.2, blur_prob=0.0, **IDENTITY)
    gray = ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 0.02) & ((out[:, 1] - out[:, 2]).abs().amax((1, 2)) < 0.02)
    assert abs(gray.float().mean().item() - 0.2) < 0.06


def _changed(out, reference):
    return ((out - reference).abs().amax((1, 2, 3)) > 0.02).float().mean().item()


def test_jitter_rate(photo_npz):
    ref = views(photo_npz, batches=1, **FIXED)[0]
    out = views(photo_npz, **{**FIXED, "jitter_prob": 0.8})
    assert abs(_changed(out, ref) - 0.8) < 0.06


@pytest.mark.parametrize("prob", [0.5, 0.0])
def test_blur_rate_and_cifar_variant_without_blur(photo_npz, prob):
    ref = views(photo_npz, batches=1, **FIXED)[0]
    out = views(photo_npz, **{**FIXED, "blur_prob": prob, "blur_sigma": (1.0, 2.0)})
    assert abs(_changed(out, ref) - prob) < 0.07


def test_parity_with_torchvision(tmp_path):
    """Same images, same parameters: output statistics of the two backends agree."""
    from data_pipeline.sample_data import make_photo_crops

    x, y, _ = make_photo_crops(size=48, train_per_class=52, val_per_class=1, seed=2)["train"]
    data = npz(tmp_path / "photos.npz", list(x), y)
    stats = {}
    for backend in ("dali", "torchvision"):
        out = views(data, backend=backend, batches=4)
        stats[backend] = (out.mean((0, 2, 3)), out.std((0, 2, 3)))
    assert torch.allclose(stats["dali"][0], stats["torchvision"][0], atol=0.12)  # per-channel mean
    assert torch.allclose(stats["dali"][1], stats["torchvision"][1], rtol=0.12)  # per-channel std


def test_crop_area_distribution_parity(coord_npz):
    areas = {}
    for backend in ("dali", "torchvision"):
        out = views(coord_npz, backend=backend, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, **IDENTITY)
        r, g = out[:, 0] * 255 / 2, out[:, 1] * 255 / 2
        areas[backend] = ((r.amax((1, 2)) - r.amin((1, 2)) + 1) * (g.amax((1, 2)) - g.amin((1, 2)) + 1)) / 128**2
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert torch.allclose(areas["dali"].quantile(qs), areas["torchvision"].quantile(qs), atol=0.08)


@pytest.mark.slow
def test_sharding_two_ranks(tmp_path):
    data = npz(tmp_path / "idx.npz", [np.full((16, 16, 3), i % 255) for i in range(100)])
    proc = run_torchrun("dali_shards.py", str(tmp_path / "seen"), str(data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"seen.{r}").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 100 // 2 // 4
    for epoch in ("a0", "a1"):
        assert len(r0[epoch]) == len(r1[epoch]) == 48  # same number of steps on every rank
        assert not set(r0[epoch]) & set(r1[epoch])  # disjoint
        assert len(set(r0[epoch]) | set(r1[epoch])) == 96  # cover all but the remainder
    assert r0["a0"] != r0["a1"]  # reshuffled between epochs
    assert r0["a0"] == r0["b0"] and r1["a1"] == r1["b1"]  # reproducible from the seed


@pytest.mark.parametrize("junk", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_corrupt_file_is_named(photo_data, tmp_path, junk):
    root, bad = corrupt_copy(photo_data, tmp_path, "coffee", 2, junk)
    cfg = DataConfig(root=str(root), backend="dali", image_size=16, batch_size=80, num_workers=1)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        list(build_loader(cfg, 0, 0, 1, CPU))


@pytest.mark.parametrize("junk", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_corrupt_file_skipped_and_counted(photo_data, tmp_path, junk):
    root, _ = corrupt_copy(photo_data, tmp_path, "coffee", 2, junk)
    cfg = DataConfig(root=str(root), backend="dali", image_size=16, batch_size=16, num_workers=1, skip_corrupt=True)
    loader = build_loader(cfg, 0, 0, 1, CPU)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch == 5 and all(b[0][0].shape[1] == 16 for b in batches)
    assert loader.corrupt_skipped == 1


def test_shard_smaller_than_a_batch_is_refused(photo_data):
    cfg = DataConfig(root=str(photo_data / "val"), backend="dali", batch_size=64)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(cfg, 0, 0, 2, CPU)


@pytest.mark.slow
def test_two_rank_dali_training_checkpoints_and_resumes(photo_data, tmp_path):
    from tests.helpers.runs import final_state, simclr

    over = tiny_overrides(photo_data / "train", tmp_path / "run", **{"data.backend": "dali", "train.epochs": 2,
                                                                       "tracking.enabled": "false"})
    first = simclr("train", "--nproc", "2", *over, "train.stop_after_steps=13")
    assert first.returncode == 0, first.stderr[-3000:]
    assert final_state(tmp_path / "run")["step"] == 13
    second = simclr("train", "--nproc", "2", *over)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    state = final_state(tmp_path / "run")
    assert state["step"] == 20 and state["config"]["data"]["backend"] == "dali"
    assert (tmp_path / "run" / "encoder.pt").exists()


def test_skipped_corrupt_images_are_counted_in_the_training_metrics(photo_data, tmp_path):
    from trainer.run.loop import train

    root, _ = corrupt_copy(photo_data, tmp_path, "coffee", 2, BAD_FILES["zero_byte"])
    cfg = load_config(None, tiny_overrides(root, tmp_path / "run", **{
        "data.backend": "dali", "data.skip_corrupt": "true", "train.stop_after_steps": 2, "tracking.enabled": "false"}))
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/skipped_corrupt_images"] == 1


@pytest.mark.parametrize("split", ["val", "val.npz"])
def test_eval_pipeline_matches_torchvision_resize_and_centre_crop(photo_data, split):
    from data_pipeline import build_eval_batches, open_source

    cfg = DataConfig(root=str(photo_data / "train"), backend="dali", image_size=24, num_workers=1)
    source = open_source(photo_data / split)
    dali = list(build_eval_batches(cfg, source, CPU, batch_size=16))
    tv = list(build_eval_batches(DataConfig(**{**cfg.__dict__, "backend": "torchvision"}), source, CPU, batch_size=16))
    assert [len(b[1]) for b in dali] == [16, 16, 8] == [len(b[1]) for b in tv]  # 40 images, last batch partial
    x_d, x_t = torch.cat([b[0] for b in dali]), torch.cat([b[0] for b in tv])
    assert torch.equal(torch.cat([b[1] for b in dali]), torch.cat([b[1] for b in tv]))  # same order
    assert x_d.shape == x_t.shape == (40, 3, 24, 24)
    assert (x_d - x_t).abs().mean() < 0.08  # same geometry; only the resampling filters differ
    # and not trivially: another image would be far off
    assert (x_d - x_t.roll(1, 0)).abs().mean() > 0.3


def test_one_pipeline_serves_every_epoch_with_exact_positions(tmp_path):
    """Epoch boundaries rebuild nothing; the per-epoch order is the seeded one, a stop mid-epoch
    continues in place, and only a jump (a resume at another position) builds a new pipeline."""
    from data_pipeline import open_source

    data = npz(tmp_path / "idx.npz", [np.full((16, 16, 3), i % 255) for i in range(100)])  # label = index
    cfg = DataConfig(root=str(data), backend="dali", image_size=16, batch_size=16, num_workers=1)
    loader = build_loader(cfg, seed=3, rank=0, world_size=1, device=CPU)
    source = open_source(data)
    expected = [source.epoch_order(0, 1, 3, epoch)[:96].reshape(6, 16).tolist() for epoch in range(4)]
    seen = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen.append([b[1].tolist() for b in loader])
    assert seen == expected[:3] and loader.pipelines_built == 1
    loader.set_epoch(3)
    part = [b[1].tolist() for _, b in zip(range(2), loader)]  # stopped after 2 steps (stop_after_steps)
    loader.set_epoch(3, 2)
    rest = [b[1].tolist() for b in loader]
    assert part + rest == expected[3] and loader.pipelines_built == 1
    resumed = build_loader(cfg, seed=3, rank=0, world_size=1, device=CPU)
    resumed.set_epoch(1, 4)  # a resume mid-epoch: one pipeline, at that position
    assert [b[1].tolist() for b in resumed] == expected[1][4:] and resumed.pipelines_built == 1
    resumed.set_epoch(0, 1)  # a jump backwards: rebuilt there
    assert [b[1].tolist() for b in resumed] == expected[0][1:] and resumed.pipelines_built == 2


def test_array_sources_are_fed_whole_batches(tmp_path, monkeypatch):
    """No per-sample callback on the training thread: one feed call per batch, one dense array."""
    from data_pipeline import dali

    data = npz(tmp_path / "idx.npz", [np.full((16, 16, 3), i % 255) for i in range(64)])
    calls = []
    real = dali._BatchFeed.__next__

    def counting(self):
        out = real(self)
        calls.append(out[0].shape)
        return out

    monkeypatch.setattr(dali._BatchFeed, "__next__", counting)
    loader = build_loader(DataConfig(root=str(data), backend="dali", image_size=16, batch_size=16, num_workers=1),
                          0, 0, 1, CPU)
    assert len(list(loader)) == 4
    assert calls and all(shape == (16, 16, 16, 3) for shape in calls)
    assert len(calls) <= 4 + 2  # one per batch, plus what DALI prefetched (prefetch_depth 2)


def test_on_device_arrays_give_the_same_batches(tmp_path, photo_data):
    """data.on_device: the array set is uploaded once and each batch gathered where it is augmented
    (on the CPU here: the same code path as on a GPU); the order equals the host-fed pipeline's."""
    data = npz(tmp_path / "idx.npz", [np.full((16, 16, 3), i % 255) for i in range(100)])
    cfg = DataConfig(root=str(data), backend="dali", image_size=16, batch_size=16, num_workers=1,
                     augment=AugmentConfig(**FIXED))
    host = build_loader(cfg, 3, 0, 1, CPU)
    kept = build_loader(DataConfig(**{**cfg.__dict__, "on_device": True}), 3, 0, 1, CPU)
    assert kept.device_images is not None and kept.device_images.shape == (100, 16, 16, 3)
    for epoch in (0, 1):
        host.set_epoch(epoch)
        kept.set_epoch(epoch)
        for ((h1,), hy), ((k1,), ky) in zip(host, kept, strict=True):
            assert torch.equal(hy, ky) and torch.equal(h1, k1)  # fixed augmentation: identical views
    assert kept.pipelines_built == 1
    with pytest.raises(DataError, match="data.on_device=true keeps an array dataset"):
        build_loader(DataConfig(root=str(photo_data / "train"), backend="dali", batch_size=8, on_device=True),
                     0, 0, 1, CPU)
    with pytest.raises(DataError, match="data.on_device=true is a DALI option"):
        build_loader(DataConfig(root=str(data), backend="torchvision", batch_size=8, on_device=True), 0, 0, 1, CPU)


@pytest.mark.slow
def test_on_device_feed_on_two_ranks_reads_each_ranks_own_samples(tmp_path):
    """data.on_device on 2 gloo ranks: every batch's sample ids equal the host feed's and the rank's
    share of the epoch order (a rank's order is a strided view of the global permutation; the feed
    once sliced the permutation itself, so both ranks read the wrong samples)."""
    data = npz(tmp_path / "idx.npz", [np.full((16, 16, 3), i % 255) for i in range(100)])
    out = tmp_path / "ids"
    proc = run_torchrun("on_device_ranks.py", str(data), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = []
    for rank in (0, 1):
        result = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert result["pipelines_built"] == 1
        assert len(result["rows"]) == 2 * 6  # 50 samples per rank in batches of 8: 6 a rank and epoch
        for row in result["rows"]:
            assert row["on_device"] == row["host"] == row["order"], (rank, row)
            assert row["views_equal"]
            if row["epoch"] == 0:
                seen += row["on_device"]
    assert len(seen) == len(set(seen)) == 96  # disjoint across ranks


def test_decoder_buffers_are_sized_from_the_images(tmp_path, photo_data):
    """nvJPEG's per-thread buffers follow the dataset (32 px photos: the 1 MiB floor, not ImageNet's
    211 MB); one large image among them raises them to twice its decoded size."""
    from data_pipeline.decoder_sizing import MIN_PADDING, decoder_sizing
    from data_pipeline.layouts import open_source

    small = decoder_sizing(open_source(photo_data / "train"))
    assert (small.max_width, small.max_height) == (32, 32)
    assert small.device_padding == small.host_padding == MIN_PADDING
    assert small.planned_mb(8) == {"device": 8.0, "pinned": 16.0}
    tree, _ = corrupt_copy(photo_data, tmp_path, "coffee", 0, b"")  # an unreadable header is skipped
    last_class = sorted(d for d in tree.iterdir() if d.is_dir())[-1]  # the dataset's last sample: always sampled
    Image.new("RGB", (1200, 900)).save(last_class / "zz_large.jpg")
    large = decoder_sizing(open_source(tree))
    assert (large.max_width, large.max_height) == (1200, 900)
    assert large.device_padding == 7 * 2**20  # 2 x 1200 x 900 x 3 bytes, in whole MiB
    assert decoder_sizing(open_source(photo_data / "train.npz")) is None  # not decoded by DALI


def test_a_file_name_that_is_not_utf8_is_read(tmp_path, photo_data):
    """DALI reads files by the bytes of their names: a Latin-1 name (os.fsdecode's surrogates) used
    to raise UnicodeEncodeError mid-epoch."""
    import os
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(photo_data / "train", tree)
    first = sorted((tree / "coffee").iterdir())[0]
    first.rename(tree / "coffee" / os.fsdecode(b"caf\xe9.jpg"))
    loader = build_loader(DataConfig(root=str(tree), backend="dali", image_size=16, batch_size=16, num_workers=1),
                          0, 0, 1, CPU)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch == 5 and sum(len(b[1]) for b in batches) == 80
