"""Runs end closed: a crash marks the MLflow run FAILED; Ctrl-C, SIGTERM and SIGHUP (one process,
--nproc, torchrun, the whole process group) stop at a step boundary with a checkpoint; a second
Ctrl-C aborts at once; a run a hard kill left RUNNING is marked on resume; messages never share
a line with the progress bar."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import REPO, checkpoint_run_id, run_status, start_training, tiny_overrides, wait_for_steps
from trainer.config import load_config
from trainer.run.loop import train
from trainer.state import checkpoint as ckpt


def test_a_crash_marks_the_mlflow_run_failed(tiny_config, monkeypatch, tmp_path):
    import trainer.losses.nt_xent as loss_module

    calls = {"n": 0}
    real = loss_module.nt_xent

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "nt_xent", crash_on_third)
    cfg = tiny_config()
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_local_run_stops_at_a_step_boundary_with_a_checkpoint_and_a_killed_run(photo_data, tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = start_training(photo_data, run_dir, "trainer")
    wait_for_steps(run_dir, proc)
    start = time.time()
    os.killpg(proc.pid, sig)  # what the terminal does on Ctrl-C: the whole process group
    out = proc.communicate(timeout=60)[0]
    elapsed = time.time() - start
    assert proc.returncode == code, out[-3000:]
    newest = ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(newest)
    assert state["step"] >= 3 and f"stopped at step {state['step']}" in out and "resume" in out
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", checkpoint_run_id(state)) == "KILLED"
    print(f"[measured] {sig.name}: stopped {elapsed:.1f}s after the signal, 0 steps lost")


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_every_rank_at_one_step(photo_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training(photo_data, run_dir, "launch", "train", "--nproc", "2")
    wait_for_steps(run_dir, proc)
    start = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=90)[0]
    elapsed = time.time() - start
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    said = "SIGINT: stopping within train.stop_check_every=10 steps, where the ranks agree to stop"
    assert out.count(said) == 1, out[-3000:]  # said once, not per rank, and when the ranks will stop
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and f"stopped at step {state['step']}" in out
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", checkpoint_run_id(state)) == "KILLED"
    print(f"[measured] Ctrl-C under torchrun (2 ranks): ended {elapsed:.1f}s after the signal, 0 steps lost")


@pytest.mark.slow
@pytest.mark.parametrize("launcher,sig", [(("trainer",), signal.SIGTERM), (("trainer",), signal.SIGHUP),
                                          (("launch", "train", "--nproc", "2"), signal.SIGTERM),
                                          (("launch", "train", "--nproc", "2"), signal.SIGHUP)],
                         ids=["one-process-sigterm", "one-process-sighup", "nproc2-sigterm", "nproc2-sighup"])
def test_a_signal_to_the_whole_process_group_checkpoints_and_exits_cleanly(photo_data, tmp_path, launcher, sig):
    """What scancel, docker stop and systemd do (SIGTERM to the process group), or a dropped ssh
    session (SIGHUP): DataLoader workers (2 here) must not die first; every run ends in a
    checkpoint, a KILLED MLflow run, the resume hint and 128 + the signal, with no traceback."""
    run_dir = tmp_path / "run"
    proc = start_training(photo_data, run_dir, *launcher, **{"data.num_workers": 2})
    wait_for_steps(run_dir, proc)
    start = time.time()
    os.killpg(proc.pid, sig)
    out = proc.communicate(timeout=120)[0]
    print(f"[measured] {sig.name} to the process group ({' '.join(launcher)}): ended {time.time() - start:.1f}s "
          "after the signal, checkpointed")
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out and "resume" in out, out[-3000:]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["step"] >= 3 and f"stopped at step {state['step']}" in out
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", checkpoint_run_id(state)) == "KILLED"


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(photo_data, tmp_path):
    run_dir = tmp_path / "run"
    # slow steps (bigger images and batch) so that the second Ctrl-C lands before the next step boundary
    proc = start_training(photo_data, run_dir, "trainer", **{"data.image_size": 64, "data.batch_size": 32,
                                                             "model.arch": "resnet18", "model.cifar_stem": "true"})
    wait_for_steps(run_dir, proc, steps=1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.5)  # a human's second Ctrl-C, not the same one delivered twice
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "aborted" in out


def test_a_second_ctrl_c_while_a_stopped_run_exits_still_aborts_at_once():
    """The run stopped at a step boundary on the first Ctrl-C and is exiting (MLflow's exit hooks,
    threads): a second Ctrl-C then died of the signal (-2) instead of the promised abort (130)."""
    import sys

    code = ("import os, signal, threading, time\n"
            "from trainer.run.interrupts import stop_on_interrupt\n"
            "stop = threading.Event()\n"
            "with stop_on_interrupt(stop):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.2)\n"
            "assert stop.is_set()\n"
            "time.sleep(1.3)  # past the window in which a repeat is the same Ctrl-C\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(5)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert "aborted" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_run_left_running_by_a_hard_kill_is_marked_on_resume(photo_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training(photo_data, run_dir, "trainer", **{"checkpoint.every_steps": 2})
    wait_for_steps(run_dir, proc, steps=4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert run_status(uri, checkpoint_run_id(state)) == "RUNNING"  # nobody could close it
    over = {"train.epochs": 200, "train.log_every": 1, "train.stop_after_steps": state["step"] + 2}  # its own schedule
    resumed = train(load_config(None, tiny_overrides(photo_data / "train", run_dir, **over)))
    assert resumed.run_id == checkpoint_run_id(state)
    run = MlflowClient(uri).get_run(resumed.run_id)
    assert run.info.status == "KILLED"  # stopped at train.stop_after_steps, short of its schedule: not FINISHED
    assert run.data.tags["simclr.stopped_early"].startswith(f"at step {state['step'] + 2} of ")
    assert run.data.tags["simclr.unclean_exits"] == "1"


@pytest.mark.slow
def test_messages_during_training_never_share_a_line_with_the_progress_bar(photo_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training(photo_data, run_dir, "trainer", **{"train.progress_bar": "true"})
    wait_for_steps(run_dir, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "pretrain:" in out  # the bar was drawn
    pieces = [piece for line in out.split("\n") for piece in line.split("\r")]
    said = [piece for piece in pieces if "SIGTERM: stopping" in piece]
    assert said and all(piece.startswith("[simclr] warning: SIGTERM") for piece in said), said
