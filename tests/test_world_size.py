"""A checkpoint written by W ranks resumes on W' ranks with the same global batch: every global
step after the change uses the same samples as an uninterrupted run (and, with the torchvision
backend, the same augmented views), in the same MLflow run."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import checkpoint_run_id, run_status, run_torchrun, simclr, tiny_overrides
from trainer.config import load_config
from trainer.run.loop import train
from trainer.state import checkpoint as ckpt


@pytest.fixture(scope="module")
def indexed_npz(photo_data, tmp_path_factory) -> Path:
    """The training photos with labels = sample indices, so a batch's labels say which samples it held."""
    with np.load(photo_data / "train.npz") as data:
        x = data["x"]
    path = tmp_path_factory.mktemp("indexed") / "indexed.npz"
    np.savez(path, x=x, y=np.arange(len(x)))
    return path


def per_step(record_dir: Path) -> dict[int, dict[int, float]]:
    """{global step: {sample index: checksum of its two views}} over every rank's records."""
    steps: dict[int, dict[int, float]] = defaultdict(dict)
    for file in record_dir.glob("rank*.jsonl"):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            steps[row["step"]].update(zip(row["samples"], row["view_sums"]))
    return dict(steps)


def record(npz: Path, run_dir: Path, record_dir: Path, nproc: int, **extra) -> None:
    # checkpoints only where the test needs them: at the stop (step 7) and at the end
    over = tiny_overrides(npz, run_dir, **{"train.epochs": 2, "checkpoint.every_steps": 100, **extra})
    proc = run_torchrun("record_batches.py", str(record_dir), *over, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def straight(indexed_npz, tmp_path_factory) -> dict[int, dict[int, float]]:
    """The uninterrupted one-process run both world-size changes are compared with (made once)."""
    folder = tmp_path_factory.mktemp("straight")
    record(indexed_npz, folder / "run", folder / "rec", nproc=1)
    return per_step(folder / "rec")


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_same_batches_and_run(indexed_npz, straight, tmp_path, before,
                                                                         after):
    record(indexed_npz, tmp_path / "changed", tmp_path / "rec_changed", nproc=before, **{"train.stop_after_steps": 7})
    record(indexed_npz, tmp_path / "changed", tmp_path / "rec_changed", nproc=after)
    changed = per_step(tmp_path / "rec_changed")
    assert sorted(straight) == sorted(changed) == list(range(20))  # no step skipped or repeated
    for step in range(20):
        assert set(changed[step]) == set(straight[step]), step  # the same samples in every global batch
        assert changed[step] == straight[step], step  # and the same augmented views (torchvision)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "changed"))
    assert state["step"] == 20 and state["world_size_history"] == [[0, before], [7, after]]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("simclr").experiment_id],
                              filter_string=f"attributes.run_id = '{checkpoint_run_id(state)}'")
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["simclr.world_size_history"] == f"0:{before},7:{after}"
    assert run.data.params["world_size"] == str(before) and run.data.params["world_size.from_step_7"] == str(after)


def test_a_batch_that_does_not_divide_over_the_new_world_names_the_valid_sizes(photo_data):
    import torch

    from data_pipeline import DataError, build_loader
    from data_pipeline.config import DataConfig

    cfg = DataConfig(root=str(photo_data / "train"), backend="torchvision", image_size=16, batch_size=12)
    with pytest.raises(DataError, match=r"does not divide over 5 ranks.*valid world sizes.*1, 2, 3, 4, 6, 12"):
        build_loader(cfg, 0, 0, 5, torch.device("cpu"))


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process_into_the_same_run(photo_data, tmp_path):
    over = {"train.epochs": 2, "train.stop_after_steps": 3}  # the val set: 5 steps an epoch
    first = simclr("train", "--nproc", "2", *tiny_overrides(photo_data / "val", tmp_path / "run", **over))
    assert first.returncode == 0, first.stderr[-3000:]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 3 and state["world_size"] == 2
    resumed = train(load_config(None, tiny_overrides(photo_data / "val", tmp_path / "run", **{"train.epochs": 2})))
    assert resumed.step == 10 and resumed.run_id == checkpoint_run_id(state)
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", resumed.run_id) == "FINISHED"
