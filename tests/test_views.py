"""Views as a specification (``data.views``): size groups through both backends, per-group
augmentation (solarisation), resolution schedules at epoch boundaries, and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline import build_loader
from data_pipeline.config import AugmentConfig, DataConfig, SizeSchedule, ViewGroup
from trainer.config import ConfigError, load_config

CPU = torch.device("cpu")
BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("nvidia.dali") is None, reason="DALI is not installed"))]
# views that are the image itself (pixel / 255): what each view holds is readable
PLAIN = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip_prob": 0.0, "jitter_prob": 0.0,
         "grayscale_prob": 0.0, "blur_prob": 0.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def flat_npz(path, values: list[int], size: int = 32):
    """Flat images of the given grey levels, labelled by index."""
    np.savez(path, x=np.stack([np.full((size, size, 3), v, dtype=np.uint8) for v in values]),
             y=np.arange(len(values)))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_crop_batches_are_size_groups_cut_from_one_image(photo_data, backend):
    views = [ViewGroup(count=2, size=24), ViewGroup(count=3, size=12, crop_scale=(0.05, 0.3))]
    cfg = DataConfig(root=str(photo_data / "train"), backend=backend, image_size=24, batch_size=8, num_workers=1,
                     views=views)
    loader = build_loader(cfg, 0, 0, 1, CPU)
    assert loader.views.count == 5 and loader.views.describe() == "2x24 + 3x12 px"
    groups, labels = next(iter(loader))
    assert [tuple(g.shape) for g in groups] == [(2, 8, 3, 24, 24), (3, 8, 3, 12, 12)]
    assert groups[0].dtype == torch.float32 and labels.shape == (8,)
    assert not torch.equal(groups[1][0], groups[1][1])  # independently augmented
    tv = build_loader(DataConfig(**{**cfg.__dict__, "backend": "torchvision"}), 0, 0, 1, CPU)
    assert torch.equal(next(iter(tv))[1], labels)  # the same images in the same order on either backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_solarisation_is_a_per_group_override(tmp_path, backend):
    """BYOL's asymmetric views: the second group solarises (every pixel >= 128 inverted), the first not."""
    data = flat_npz(tmp_path / "grey.npz", [200, 40] * 8)
    views = [ViewGroup(count=1), ViewGroup(count=1, solarize_prob=1.0)]
    cfg = DataConfig(root=str(data), backend=backend, image_size=16, batch_size=16, num_workers=1,
                     augment=AugmentConfig(**PLAIN), views=views)
    (group,), labels = next(iter(build_loader(cfg, 0, 0, 1, CPU)))  # one size: one group of two views
    grey = torch.tensor([200.0, 40.0])[labels % 2]
    assert torch.allclose(group[0].mean(dim=(1, 2, 3)) * 255, grey, atol=1)
    assert torch.allclose(group[1].mean(dim=(1, 2, 3)) * 255, torch.where(grey >= 128, 255 - grey, grey), atol=1)


def test_a_resolution_schedule_changes_size_at_epoch_boundaries_and_resumes_exactly(photo_data):
    cfg = DataConfig(root=str(photo_data / "train"), backend="torchvision", image_size=24, batch_size=8,
                     num_workers=0, views=[ViewGroup(count=2, size=[(0, 16), (1, 24)]), ViewGroup(count=2, size=8)])
    loader = build_loader(cfg, 0, 0, 1, CPU)
    shapes = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        shapes.append([tuple(g.shape[-1] for g in groups) for groups, _ in loader])
    assert set(shapes[0]) == {(16, 8)} and set(shapes[1]) == {(24, 8)}
    loader.set_epoch(1)
    straight = [groups for groups, _ in loader]
    resumed = build_loader(cfg, 0, 0, 1, CPU)  # a new job resuming at epoch 1, step 3
    resumed.set_epoch(1, 3)
    for a, b in zip(straight[3:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b[0]))  # bitwise: seeded per sample, epoch and view


def test_size_schedules_follow_the_epochs():
    ramp = SizeSchedule(start=160, end=224, from_epoch=10, to_epoch=50, step=32)
    assert [ramp.at(e) for e in (0, 10, 11, 30, 49, 50, 90)] == [160, 160, 160, 192, 224, 224, 224]
    steps = ViewGroup(size=[(0, 128), (5, 160), (8, 192)])
    assert [steps.size_at(e, 224) for e in (0, 4, 5, 7, 8, 100)] == [128, 128, 160, 160, 192, 192]
    assert ViewGroup(size=0).size_at(3, 96) == 96  # 0: data.image_size



def test_a_schedule_the_run_ends_before_and_upscaled_crops_are_said_at_the_start():
    """Round 7, F11 and F4: a schedule starting after the run ends, and views larger than the
    images, were silent."""
    from data_pipeline.views import ViewSpec

    late = ViewSpec([ViewGroup(size=SizeSchedule(start=16, end=32, from_epoch=10, to_epoch=20, step=8))], 16)
    (said,) = late.notes(4)
    assert said.startswith("data.views[0].size reaches its 32 px at epoch 20, but the run has 4 epoch(s) (0-3): "
                           "every epoch trains at 16 px; raise train.epochs"), said
    (said,) = ViewSpec([ViewGroup(size=[(0, 16), (2, 24), (6, 32)])], 16).notes(4)
    assert "reaches 24 px in the last epoch, not 32 px" in said, said
    assert ViewSpec([ViewGroup(size=[(0, 16), (3, 32)])], 16).notes(4) == []  # its last size in its last epoch
    assert ViewSpec([ViewGroup(size=24)], 16).notes(4, images=(32, 40)) == []
    (said,) = ViewSpec([ViewGroup(count=2), ViewGroup(count=4, size=16)], 224).notes(1, images=(32, 40))
    assert said.startswith("views of up to 224 px are cut from images of about 32 x 40 px") and "at most 32 px" in said


def test_the_typical_image_size_is_read_from_headers_of_every_layout(photo_data, tmp_path):
    from data_pipeline.layouts import open_source
    from data_pipeline.sources import typical_image_size

    assert typical_image_size(open_source(str(photo_data / "train"))) == (32, 32)  # JPEG files
    assert typical_image_size(open_source(str(photo_data / "train.npz"))) == (32, 32)  # one dense array
    assert typical_image_size(open_source(str(flat_npz(tmp_path / "wide.npz", [1, 2], size=20)))) == (20, 20)


def test_a_training_run_says_both_at_its_start(photo_data, tmp_path):
    from tests.helpers.runs import tiny_overrides
    from trainer.run.loop import train

    run_dir = tmp_path / "run"
    train(load_config(None, tiny_overrides(photo_data / "train", run_dir, **{
        "data.views": "[{count: 2, size: [[0, 48], [5, 16]]}]", "train.stop_after_steps": 1})))
    log = (run_dir / "simclr.log").read_text()
    assert "data.views[0].size reaches its 16 px at epoch 5, but the run has 2 epoch(s)" in log, log
    assert "views of up to 48 px are cut from images of about 32 x 32 px" in log, log

@pytest.mark.skipif(__import__("importlib").util.find_spec("nvidia.dali") is None, reason="DALI is not installed")
def test_dali_builds_a_new_pipeline_only_where_the_size_changes(tmp_path):
    data = flat_npz(tmp_path / "idx.npz", list(range(64)))
    cfg = DataConfig(root=str(data), backend="dali", image_size=16, batch_size=16, num_workers=1,
                     views=[ViewGroup(count=2, size=[(0, 16), (2, 24)])])
    loader = build_loader(cfg, 0, 0, 1, CPU)
    sizes = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        sizes.append({groups[0].shape[-1] for groups, _ in loader})
    assert sizes == [{16}, {16}, {24}]
    assert loader.pipelines_built == 2 and [at for at, _ in loader.rebuilds] == [2]
    assert loader.rebuilds[0][1] > 0  # the stall is measured (and logged as perf/pipeline_rebuild_s)


@pytest.mark.parametrize("spec,said", [
    ("[{count: 0}]", r"data.views\[0\].count: 0 is out of range; must be at least 1 view"),
    ("[{count: 2, size: 6}]", r"data.views\[0\].size: 6 is out of range; must be at least 8 pixels"),
    ("[{count: 2}, {count: 6, size: 96, crop_scale: [0.0, 0.14]}]",
     r"data.views\[1\].crop_scale: \(0.0, 0.14\) is out of range; must be \[min, max\] with 0 < min <= max <= 1"),
    ("[{count: 2, size: {start: 160, end: 224, from_epoch: 80, to_epoch: 40}}]",
     r"data.views\[0\].size: 'from_epoch=80, to_epoch=40' .* the schedule must end after it starts"),
    ("[{count: 2, size: [[5, 160], [1, 224]]}]", r"data.views\[0\].size: .* must start at epoch 0 with epochs"),
    ("[{count: 1}]", r"data.views: \[1\] .* needs at least 2 views in all"),
    ("[{count: 2, scale: [0.1, 1.0]}]", r"unknown config key 'data.views\[0\].scale' \(did you mean 'crop_scale'\?\)"),
    ("[{count: 2, size: big}]", r"data.views\[0\].size: 'big' is none of the allowed forms"),
])
def test_bad_view_specifications_get_one_line_naming_the_key(tmp_path, spec, said):
    with pytest.raises(ConfigError, match=said) as caught:
        load_config(None, [f"data.views={spec}", f"train.run_dir={tmp_path}/run"])
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_recipe_with_views_and_a_timm_encoder_works_with_every_command(photo_data, tmp_path):
    """As a user writes it: a recipe with multi-crop views, a resolution schedule and a timm encoder,
    trained on 2 ranks, resumed on 1, then evaluated, embedded and benchmarked."""
    import json

    from tests.helpers.runs import simclr

    recipe = tmp_path / "multicrop_timm.yaml"
    recipe.write_text(
        "model: {arch: timm/resnet10t, proj_hidden_dim: 32, proj_out_dim: 16}\n"
        "data:\n  backend: torchvision\n  batch_size: 8\n  num_workers: 0\n  views:\n"
        "    - {count: 2, size: [[0, 24], [1, 32]]}\n"
        "    - {count: 2, size: 16, crop_scale: [0.1, 0.4], blur_prob: 0.0}\n"
        "optim: {lr: 0.5, warmup_epochs: 1}\n"
        "train: {epochs: 2, device: cpu, progress_bar: false, log_every: 5}\n"
        "checkpoint: {every_steps: 5}\ntracking: {enabled: false}\n")
    run = tmp_path / "run"
    common = ["--config", str(recipe), f"data.root={photo_data / 'train'}", f"train.run_dir={run}"]
    proc = simclr("train", "--nproc", "2", *common, "train.stop_after_steps=12")  # into epoch 1: the new size
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = simclr("train", *common)  # one rank finishes it
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sizes = [(r["step"], r["data/view_size_0"], r["data/view_size_1"]) for r in rows if "data/view_size_0" in r]
    assert sizes == [(10, 24, 16), (20, 32, 16)]  # logged at each epoch's end: the size in force during it
    assert rows[-1]["step"] == 20 and (run / "encoder.pt").exists()
    from launch.cli import main  # the other commands in this process: each subprocess costs seconds

    def command(*args: str) -> None:
        with pytest.raises(SystemExit) as done:
            main(list(args))
        assert done.value.code == 0, args

    command("eval", "--checkpoint", str(run / "encoder.pt"), "--train-data", str(photo_data / "train"),
            "--val-data", str(photo_data / "val"), "--device", "cpu", "--workers", "0", "--probe-epochs", "1",
            "--no-baseline", "--out", str(tmp_path / "eval"))
    assert 0 <= json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]["SimCLR"]["linear_top1"] <= 1
    command("embed", "--checkpoint", str(run / "encoder.pt"), "--data", str(photo_data / "val"), "--out",
            str(tmp_path / "emb"), "--dtype", "float32")
    import numpy as np

    assert np.load(tmp_path / "emb" / "embeddings.npy").shape == (40, 512)  # resnet10t's pooled width
    command("bench", "views", "--arch", "timm/resnet10t", "--views", "2x32", "2x32+2x16", "--batch-size", "4",
            "--warmup", "0", "--iters", "1", "--device", "cpu", "--out", str(tmp_path / "views.json"))
    rows = json.loads((tmp_path / "views.json").read_text())["rows"]
    assert [r["views"] for r in rows] == ["2x32", "2x32+2x16"] and rows[1]["flop_ratio"] > 1
