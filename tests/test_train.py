"""End-to-end training on the CPU: resume is bitwise exact (1 and 2 ranks), precision modes,
non-finite handling, and a dead rank ends the job instead of hanging it."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import assert_bitwise_equal, checkpoint_run_id, final_state, simclr, tiny_overrides
from trainer.config import load_config
from trainer.run.loop import train
from trainer.run.skip_counters import NonFiniteLossError
from trainer.state import checkpoint as ckpt


def test_resume_is_bitwise_identical_single_process(photo_data, tmp_path):
    # checkpoints at the stop and the end only (each costs a fsynced write)
    common = dict(**{"train.epochs": 2, "data.num_workers": 2, "tracking.enabled": "false",
                     "checkpoint.every_steps": 100})
    straight = train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "a", **common)))
    assert straight.step == 20 and straight.encoder_path.exists()
    stopped = train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "b", **common,
                                                     **{"train.stop_after_steps": 13})))
    assert stopped.step == 13 and stopped.encoder_path is None
    resumed = train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "b", **common)))
    assert resumed.step == 20
    assert_bitwise_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    # and the test can fail: a run with another seed is not equal
    other = train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "c", **common,
                                                   **{"train.seed": 1})))
    with pytest.raises(AssertionError):
        assert_bitwise_equal(final_state(tmp_path / "a"), final_state(tmp_path / "c"))
    assert other.step == 20


@pytest.mark.slow
def test_resume_is_bitwise_identical_two_ranks(photo_data, tmp_path):
    # the val set (40 images: 5 steps an epoch): stopped mid-epoch, the resume crosses an epoch boundary
    common = {"train.epochs": 2, "tracking.enabled": "false", "checkpoint.every_steps": 100}
    data = photo_data / "val"
    a = simclr("train", "--nproc", "2", *tiny_overrides(data, tmp_path / "a", **common))
    assert a.returncode == 0, a.stderr[-3000:]
    b = simclr("train", "--nproc", "2", *tiny_overrides(data, tmp_path / "b", **common,
                                                        **{"train.stop_after_steps": 3}))
    assert b.returncode == 0, b.stderr[-3000:]
    assert final_state(tmp_path / "b")["step"] == 3
    b2 = simclr("train", "--nproc", "2", *tiny_overrides(data, tmp_path / "b", **common))
    assert b2.returncode == 0, b2.stderr[-3000:]
    assert "resumed from" in b2.stdout
    sa, sb = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert sa["step"] == 10 and sa["world_size"] == 2 and len(sa["rng"]) == 2
    assert_bitwise_equal(sa, sb)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains(tiny_config, dtype):
    # timm's test ResNet: low-precision convolutions take slow reference kernels on the CPU
    cfg = tiny_config(**{"precision.dtype": dtype, "train.stop_after_steps": 2, "tracking.enabled": "false",
                         "model.arch": "timm/test_resnet", "model.cifar_stem": "false"})
    result = train(cfg)
    assert result.step == 2 and torch.isfinite(torch.tensor(result.loss))
    state = final_state(cfg.train.run_dir)
    assert bool(state["scaler"]) == (dtype == "fp16")  # the GradScaler state is checkpointed


def test_nonfinite_steps_are_skipped_then_stop_with_checkpoint_intact(tiny_config, monkeypatch):
    import trainer.losses.nt_xent as loss_module

    cfg = tiny_config(**{"precision.max_consecutive_nonfinite": 3, "tracking.enabled": "false",
                         "checkpoint.every_steps": 2})
    real = loss_module.nt_xent
    calls = {"n": 0}

    def flaky(views, temperature, gather=True):
        calls["n"] += 1
        loss, acc = real(views, temperature, gather)
        if calls["n"] == 3 or calls["n"] > 4:  # one isolated bad step, then a run of them
            loss = loss * float("nan")
        return loss, acc

    monkeypatch.setattr(loss_module, "nt_xent", flaky)
    # the streak (steps 5, 6, 7, 8) is read on the host at the log window of step 8 (train.log_every=2)
    with pytest.raises(NonFiniteLossError, match="4 consecutive steps.*found at step 8.*checkpoint.*intact"):
        train(cfg)
    state = final_state(cfg.train.run_dir)
    assert state["step"] == 4  # saved before the failure, never overwritten by a bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_mismatched_checkpoint_is_refused(tiny_config):
    from trainer.state.checkpoint import CheckpointError

    cfg = tiny_config(**{"train.stop_after_steps": 2, "tracking.enabled": "false"})
    train(cfg)
    cfg2 = tiny_config(**{"model.proj_out_dim": 8, "tracking.enabled": "false"})
    with pytest.raises(CheckpointError, match="model.proj_out_dim 16 -> 8"):
        train(cfg2)


@pytest.mark.slow
@pytest.mark.parametrize("rank,sig", [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGKILL)],
                         ids=["dead", "stuck", "rank0-dead"])
def test_killed_rank_ends_the_job_within_timeout(photo_data, tmp_path, rank, sig):
    """A dead rank (SIGKILL) or a stuck one (SIGSTOP: its sockets stay open, so only the collective
    timeout can notice) ends ``simclr train --nproc 2`` with one line, not a hang or a gloo traceback:
    which rank, how, the newest checkpoint and the resume command; the MLflow run FAILED with a tag
    naming the rank (closed by the launcher when rank 0 itself died); no temp folder left."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from tests.helpers.runs import start_training
    from tests.test_run_ownership import ranks_of

    run_dir = tmp_path / "run"
    # a tiny CPU step takes well under a second: 10 s is a safe collective timeout here
    launcher = start_training(photo_data, run_dir, "launch", "train", "--nproc", "2",
                              **{"train.epochs": 50, "dist.timeout_s": 10, "checkpoint.every_steps": 2})
    deadline = time.time() + 120
    while not list(run_dir.glob("checkpoints/step_*.pt")):  # training is under way
        assert time.time() < deadline and launcher.poll() is None, launcher.communicate()[0][-2000:]
        time.sleep(0.5)
    os.kill(ranks_of(launcher)[rank].pid, sig)
    start = time.time()
    try:
        out = launcher.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail("the job hung after a rank died")
    elapsed = time.time() - start
    assert launcher.returncode == (137 if sig == signal.SIGKILL else 1) and "Traceback" not in out, out[-3000:]
    how = "stopped answering (stopped (SIGSTOP" if sig == signal.SIGSTOP else f"was killed by {sig.name}"
    (line,) = [x for x in out.splitlines() if x.startswith(f"[simclr] error: rank {rank} ")]
    newest = ckpt.latest_checkpoint(run_dir)  # checkpoints intact
    assert how in line and f"Newest checkpoint: {newest}" in line and "Resume with: simclr train --nproc 2" in line
    assert elapsed < 10 + 45  # dist.timeout_s plus start-up slack
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(checkpoint_run_id(ckpt.load_checkpoint(newest)))
    assert run.info.status == "FAILED" and run.data.tags["simclr.failed_rank"] == str(rank)
    assert not list(Path(tempfile.gettempdir()).glob(f"simclr_ranks_{launcher.pid}_*"))
    print(f"[measured] rank {rank} {sig.name}: the job ended {elapsed:.1f}s later (dist.timeout_s=10)")


def test_stop_event_checkpoints_at_the_next_step_and_the_run_resumes(tiny_config):
    """The stop request is passed in (the SLURM job's signal handlers set it): the run stops at the
    next step boundary with a checkpoint, and a later run resumes from it to the end."""
    import threading

    cfg = tiny_config(**{"tracking.enabled": "false", "checkpoint.every_steps": 100})
    stop = threading.Event()
    stopped = train(cfg, stop=stop, on_start=lambda *_: stop.set())  # set once started (before: see test_run_ownership)
    assert stopped.preempted and stopped.step == 1 and stopped.encoder_path is None
    assert final_state(cfg.train.run_dir)["step"] == 1  # written although every_steps is 100
    finished = train(cfg)  # a fresh Event: nothing asks it to stop
    assert not finished.preempted and finished.step == 20 and finished.encoder_path.exists()
