"""Checkpoints under failure: a full disk leaves no debris and the last checkpoint newest, stale
temporary files go, a truncated only checkpoint is refused (not restarted), an earlier run's
checkpoints are not overwritten by accident, and a finished run run again does nothing."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers.runs import assert_one_line_error, checkpoint_run_id, simclr, tiny_overrides
from trainer.run.loop import train
from trainer.state import checkpoint as ckpt


def fill_then_fail(monkeypatch, after_bytes: int = 4096) -> None:
    """torch.save in the checkpoint writer writes part of the file, then the disk is 'full'."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", save)


def test_failed_checkpoint_write_leaves_no_debris_and_the_previous_checkpoint_newest(tiny_config, monkeypatch):
    cfg = tiny_config(**{"tracking.enabled": "false", "train.stop_after_steps": 2})
    train(cfg)
    directory = ckpt.checkpoint_dir(cfg.train.run_dir)
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_000000002.pt"]
    fill_then_fail(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match="(?i)no space left.*step_000000002.pt.*intact.*free") as info:
        train(tiny_config(**{"tracking.enabled": "false", "train.stop_after_steps": 4}))
    assert "keep_last" not in str(info.value)  # one checkpoint on disk: fewer kept would free nothing
    assert sorted(p.name for p in directory.iterdir()) == ["step_000000002.pt"]  # no temp file left
    assert ckpt.load_checkpoint(directory / "step_000000002.pt")["step"] == 2


def test_stale_temp_checkpoints_are_removed_at_start(tiny_config):
    cfg = tiny_config(**{"tracking.enabled": "false", "train.stop_after_steps": 2})
    directory = ckpt.checkpoint_dir(cfg.train.run_dir)
    directory.mkdir(parents=True)
    stale = [directory / ".step_000000004.pt.tmp-123", directory / ".step_000000006.pt.tmp-456"]
    for path in stale:
        path.write_bytes(b"x" * 100)
    train(cfg)
    assert not any(p.exists() for p in stale)
    assert [p.name for p in directory.iterdir()] == ["step_000000002.pt"]


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/bin/mount").exists(), reason="mounting a tmpfs needs root")
def test_real_full_disk_is_one_line_and_keeps_the_last_checkpoint(photo_data, tmp_path):
    """A real file system that fills up: a tmpfs with room for one checkpoint, not two."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=140m", "tmpfs", str(mnt)], check=True)
    try:
        # ResNet-18's checkpoints (~90 MB): one fits, two do not
        over = {"tracking.enabled": "false", "checkpoint.keep_last": 3, "train.stop_after_steps": 6,
                "model.arch": "resnet18", "model.cifar_stem": "true"}
        proc = simclr("train", *tiny_overrides(photo_data / "train", mnt / "run", **over))
        assert_one_line_error(proc, "no space left", "step_000000002.pt", "intact")
        names = sorted(p.name for p in ckpt.checkpoint_dir(mnt / "run").iterdir())
        assert names == ["step_000000002.pt"]
        assert ckpt.load_checkpoint(ckpt.checkpoint_dir(mnt / "run") / names[0])["step"] == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_the_only_checkpoint_truncated_is_refused_not_restarted(photo_data, tmp_path):
    """It warned, then started over from step 0 in a new MLflow run, abandoning the original."""
    over = tiny_overrides(photo_data / "train", tmp_path / "run", **{"train.stop_after_steps": 2})
    assert simclr("train", *over).returncode == 0
    (only,) = ckpt.list_checkpoints(ckpt.checkpoint_dir(tmp_path / "run"))
    only.write_bytes(only.read_bytes()[:1000])
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    proc = simclr("train", *tiny_overrides(photo_data / "train", tmp_path / "run"))
    assert_one_line_error(proc, "no checkpoint", "usable", "checkpoint.resume=", "train.overwrite=true")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before  # nothing started


def test_resume_none_into_a_folder_with_checkpoints_needs_overwrite(tiny_config):
    from trainer.state.checkpoint import CheckpointError

    train(tiny_config(**{"train.stop_after_steps": 2}))
    directory = ckpt.checkpoint_dir(tiny_config().train.run_dir)
    with pytest.raises(CheckpointError, match="earlier run.*new train.run_dir.*train.overwrite=true"):
        train(tiny_config(**{"checkpoint.resume": "none", "train.stop_after_steps": 2}))
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_000000002.pt"]  # untouched
    first_run = checkpoint_run_id(ckpt.load_checkpoint(ckpt.list_checkpoints(directory)[0]))
    result = train(tiny_config(**{"checkpoint.resume": "none", "train.overwrite": "true",
                                  "train.stop_after_steps": 4}))
    assert result.step == 4 and result.run_id != first_run
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(directory)[0])
    assert checkpoint_run_id(state) == result.run_id  # the next plain resume continues the new run
    assert [r["step"] for r in tracking_rows(directory.parent)] == [2, 4]


def tracking_rows(run_dir):
    from trainer.tracking import read_metrics_file

    return [r for r in read_metrics_file(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def test_a_finished_run_run_again_says_so_and_does_nothing(tiny_config, capsys):

    cfg = tiny_config(**{"tracking.log_model": "true"})
    first = train(cfg)
    assert first.step == 20
    client = MlflowClient(cfg.tracking.uri)
    artifacts = [a.path for a in client.list_artifacts(first.run_id)]
    models = client.search_logged_models(experiment_ids=[client.get_run(first.run_id).info.experiment_id])
    again = train(cfg)
    assert "already finished" in capsys.readouterr().out
    assert again.step == 20 and again.exit_code == 0 and again.run_id == first.run_id
    assert [a.path for a in client.list_artifacts(first.run_id)] == artifacts
    assert len(client.search_logged_models(experiment_ids=[client.get_run(first.run_id).info.experiment_id])) == \
        len(models)  # no second MLflow model
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_run_folder_gone_during_a_checkpoint_write_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """The folder moved between the loop's check and the write: the loop must see FileNotFoundError
    (it names where the folder went), not 'no space left on device'."""
    def save(obj, f, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(FileNotFoundError):
        ckpt.save_checkpoint({"step": 4}, tmp_path / "checkpoints", keep_last=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no partial file left


def test_a_checkpoint_write_does_not_make_a_moved_run_folder_again(tmp_path):
    """CI: the run folder was renamed just before a save; making the checkpoint folder with its
    parents put the old path back (a run split in two). The save must fail where the folder is gone."""
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        ckpt.save_checkpoint({"step": 4}, run / "checkpoints", keep_last=2)
    assert not run.exists()
