"""Bad data is named, never silently used: zero-byte and corrupt images (skipped and counted,
or one line naming the file), loose images beside class folders, a root holding both splits, and
demo data that would replace a tree it did not write."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import assert_one_line_error, corrupt_copy, simclr, tiny_overrides
from trainer.config import load_config
from trainer.run.loop import train


@pytest.mark.parametrize("workers", [0, 2])
def test_zero_byte_image_is_skipped_on_the_torchvision_backend(photo_data, tmp_path, workers):
    root, _ = corrupt_copy(photo_data, tmp_path, "coffee", 1, b"")
    cfg = load_config(None, tiny_overrides(root, tmp_path / "run", **{
        "data.skip_corrupt": "true", "data.num_workers": workers, "train.epochs": 1, "tracking.enabled": "false"}))
    result = train(cfg)
    assert result.step == 10
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"data/skipped_corrupt_images": 1' in rows


def test_a_corrupt_file_is_named_before_any_mlflow_run_exists(photo_data, tmp_path):
    """Found by the file check while the run's parts are built: no FAILED MLflow run is left behind
    for a dataset mistake, on either backend."""

    root, bad = corrupt_copy(photo_data, tmp_path, "coffee", 1, b"\xff\xd8\xff\xe0 truncated")
    for backend in ("torchvision", "dali"):
        proc = simclr("train", *tiny_overrides(root, tmp_path / backend, **{"data.backend": backend}))
        assert_one_line_error(proc, str(bad), "data.skip_corrupt=true")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_zero_byte_image_is_one_clear_line_without_skip_corrupt(photo_data, tmp_path):
    root, bad = corrupt_copy(photo_data, tmp_path, "coffee", 1, b"")
    proc = simclr("train", *tiny_overrides(root, tmp_path / "run", **{"data.num_workers": 2,
                                                                      "tracking.enabled": "false"}))
    assert_one_line_error(proc, str(bad), "empty", "data.skip_corrupt=true")


def test_loose_images_beside_class_folders_are_refused(photo_data, tmp_path):
    import shutil

    from data_pipeline import DataError, open_source

    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    loose = root / "stray.jpg"
    shutil.copy(next((root / "coffee").iterdir()), loose)
    with pytest.raises(DataError, match="stray.jpg.*outside the class folders"):
        open_source(root)


def test_a_root_holding_train_and_val_splits_is_refused(photo_data):
    from data_pipeline import DataError, open_source

    with pytest.raises(DataError, match=f"splits.*data.root={photo_data / 'train'}"):
        open_source(photo_data)  # holds train/ and val/ (and their .npz twins)


def test_make_demo_data_replaces_what_was_there(tmp_path):
    out = tmp_path / "demo"
    assert simclr("make-demo-data", "--out", str(out), "--size", "16", "--train-per-class", "6",
                  "--val-per-class", "2").returncode == 0
    (out / "train" / "stale_class").mkdir()
    (out / "train" / "stale_class" / "old.jpg").write_bytes(b"\xff\xd8old")
    assert simclr("make-demo-data", "--out", str(out), "--size", "16", "--train-per-class", "3",
                  "--val-per-class", "2").returncode == 0
    import numpy as np

    from data_pipeline import open_source

    tree = open_source(out / "train")
    assert len(tree) == len(np.load(out / "train.npz")["y"]) == 30 and "stale_class" not in tree.classes


def test_make_demo_data_never_replaces_a_tree_it_did_not_write(photo_data, tmp_path):
    """Pointed at a real dataset, make-demo-data deleted the user's images and exited 0."""
    import shutil

    real = tmp_path / "ds" / "mydataset"
    shutil.copytree(photo_data / "train", real / "train")
    before = sorted(p.relative_to(real) for p in real.rglob("*"))
    proc = simclr("make-demo-data", "--out", str(real), "--size", "16", "--train-per-class", "2",
                  "--val-per-class", "1")
    assert_one_line_error(proc, str(real), "did not write", "nothing was changed")
    assert sorted(p.relative_to(real) for p in real.rglob("*")) == before
