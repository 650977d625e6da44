"""Run-folder files survive kills and full disks: a torn last metrics line is left out (resume and
sync go on), whole files are replaced atomically, and a full disk is one line naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import REPO
from trainer.run.loop import train
from trainer.runtime.run_files import DiskFullError, append_line, atomic_write_text, read_jsonl

TORN = '{"step": 6, "time_ms": 1, "loss": 4.1'  # what a kill mid-write leaves


def test_a_torn_last_metrics_line_does_not_break_resume_or_sync(tiny_config, tmp_path):
    from trainer.config import TrackingConfig
    from trainer.tracking import sync_offline

    cfg = tiny_config(**{"train.stop_after_steps": 4})
    train(cfg)
    metrics = Path(cfg.train.run_dir) / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write(TORN)
    result = train(tiny_config())  # resumed to the end: finish_run reads the file back (curves)
    assert result.step == 20 and result.encoder_path is not None
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows if "train/loss" in r][-1] == 20
    run_id, _ = sync_offline(cfg.train.run_dir, TrackingConfig(uri=f"sqlite:///{tmp_path / 'other.db'}"), None)
    assert run_id


def test_a_damaged_middle_line_does_not_fail_a_finished_run(tiny_config, capsys):
    """The curves are drawn from the readable rows and the run finishes (it ended with exit 1 and
    MLflow FAILED, and the rerun said 'already finished')."""
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(**{"train.stop_after_steps": 4, "checkpoint.every_steps": 100})
    train(cfg)
    metrics = Path(cfg.train.run_dir) / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[0] = lines[0][:10] + "\x00garbage"  # a middle line once the run goes on
    metrics.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    result = train(tiny_config(**{"checkpoint.every_steps": 100}))
    assert result.step == 20 and result.encoder_path is not None
    assert (Path(cfg.train.run_dir) / "curves.png").exists()
    assert "damaged line(s) of" in capsys.readouterr().err
    run_id = json.loads((Path(cfg.train.run_dir) / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(cfg.tracking.uri).get_run(run_id).info.status == "FINISHED"


def test_a_bad_line_inside_the_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        read_jsonl(path)


@pytest.fixture
def full_disk(tmp_path):
    """A real tmpfs, filled to the last byte."""
    if os.geteuid() != 0 or not Path("/bin/mount").exists():
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "config.yaml").write_text("model:\n  arch: resnet18\n")
        (mnt / "metrics.jsonl").write_text('{"step": 2, "loss": 5.0}\n')
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_keeps_the_old_files_and_names_the_one_it_could_not_write(full_disk):
    with pytest.raises(DiskFullError, match=f"no space left.*{full_disk / 'config.yaml'}.*intact"):
        atomic_write_text(full_disk / "config.yaml", "model:\n  arch: resnet50\n" * 2000)
    assert (full_disk / "config.yaml").read_text() == "model:\n  arch: resnet18\n"
    assert not [p for p in full_disk.iterdir() if p.name.startswith(".")]  # no temp file left
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        append_line(full_disk / "metrics.jsonl", json.dumps({"step": 4, "loss": 4.0, "pad": "x" * 20000}))
    assert read_jsonl(full_disk / "metrics.jsonl") == [{"step": 2, "loss": 5.0}]


def test_sync_of_a_damaged_metrics_file_is_one_line_and_creates_no_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.config import TrackingConfig
    from trainer.tracking import TrackingError, sync_offline

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 2, "time_ms": 1, "loss": 5.0}\nGARBAGE\n'
                                           '{"step": 4, "time_ms": 2, "loss": 4.0}\n')
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(TrackingError, match="line 2.*damaged inside"):
        sync_offline(run_dir, TrackingConfig(uri=uri), None)
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_damaged_run_record_is_written_again_at_resume(tiny_config, capsys):
    """``mlflow_run.json`` replaced by garbage blocked every resume ("not valid JSON ... remove it");
    the checkpoint knows the MLflow run, so the record is written again from it with one note."""
    cfg = tiny_config(**{"train.stop_after_steps": 2})
    first = train(cfg)
    record = Path(cfg.train.run_dir) / "mlflow_run.json"
    record.write_text("{garbage")
    resumed = train(tiny_config(**{"train.stop_after_steps": 4}))
    assert resumed.run_id == first.run_id and resumed.step == 4
    assert "mlflow_run.json is not valid JSON" in capsys.readouterr().err
    kept = json.loads(record.read_text())
    assert kept["run_id"] == first.run_id and kept["params"]["optim.lr"] == "0.5" and kept["status"] == "KILLED"


def test_a_kill_while_the_encoder_is_written_leaves_no_encoder_pt(tmp_path):
    """encoder.pt marks a finished run (loop.py): a process killed half-way through writing it must
    leave none, not a torn file that a resume would take for a finished run."""
    script = f"""
import os, signal, torch
from torch import nn
import trainer.evaluation.export as export

def dies_half_way(obj, f):
    with open(f, "wb") as out:
        out.write(b"PK" + bytes(1000))  # the first bytes of a zip archive, then the kill
    os.kill(os.getpid(), signal.SIGKILL)

export.encoder_state_dict = lambda model: model.state_dict()
export.torch.save = dies_half_way
export.save_encoder(nn.Linear(2, 2), __import__("pathlib").Path({str(tmp_path / "encoder.pt")!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (tmp_path / "encoder.pt").exists()
    assert all(p.name.startswith(".encoder.pt.tmp-") for p in tmp_path.iterdir())  # what the writer had begun
