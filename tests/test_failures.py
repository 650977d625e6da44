"""What a user sees when things go wrong: one line naming the problem and the fix (exit 2 for user
errors), nothing already saved is lost, no debris left behind, and the MLflow run closed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers.runs import PY, REPO, assert_one_line_error, corrupt_copy, simclr, tiny_overrides
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.loop import train


def run_status(uri: str, run_id: str) -> str:
    return MlflowClient(uri).get_run(run_id).info.status


# ----------------------------------------------------------------------------------- 1. zero-byte images


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
    from mlflow.tracking import MlflowClient

    root, bad = corrupt_copy(photo_data, tmp_path, "coffee", 1, b"\xff\xd8\xff\xe0 truncated")
    for backend in ("torchvision", "dali"):
        proc = simclr("train", *tiny_overrides(root, tmp_path / backend, **{"data.backend": backend}))
        assert_one_line_error(proc, str(bad), "data.skip_corrupt=true")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_a_corrupt_image_in_an_evaluation_set_is_one_line(tiny_config, photo_data, tmp_path):
    """Evaluation's DataLoader workers re-raised the decode error with their traceback as the message."""
    train(tiny_config(**{"train.stop_after_steps": 2, "tracking.enabled": "false"}))
    root, bad = corrupt_copy(photo_data, tmp_path, "coffee", 1, b"\xff\xd8\xff\xe0" + b"\0" * 300 + b"\xff\xd9")
    proc = simclr("eval", "--checkpoint", str(ckpt.latest_checkpoint(tmp_path / "run")), "--train-data", str(root),
                  "--val-data", str(photo_data / "val"), "--device", "cpu", "--workers", "2", "--probe-epochs", "1")
    assert_one_line_error(proc, f"cannot decode image {bad}")


def test_zero_byte_image_is_one_clear_line_without_skip_corrupt(photo_data, tmp_path):
    root, bad = corrupt_copy(photo_data, tmp_path, "coffee", 1, b"")
    proc = simclr("train", *tiny_overrides(root, tmp_path / "run", **{"data.num_workers": 2,
                                                                      "tracking.enabled": "false"}))
    assert_one_line_error(proc, str(bad), "empty", "data.skip_corrupt=true")


# ----------------------------------------------------------------------------------- 2. disk full


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
        over = {"tracking.enabled": "false", "checkpoint.keep_last": 3, "train.stop_after_steps": 6}
        proc = simclr("train", *tiny_overrides(photo_data / "train", mnt / "run", **over))
        assert_one_line_error(proc, "no space left", "step_000000002.pt", "intact")
        names = sorted(p.name for p in ckpt.checkpoint_dir(mnt / "run").iterdir())
        assert names == ["step_000000002.pt"]
        assert ckpt.load_checkpoint(ckpt.checkpoint_dir(mnt / "run") / names[0])["step"] == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------------- 3, 4. runs end closed


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


def start_training(photo_data: Path, run_dir: Path, *launcher: str, **over) -> subprocess.Popen:
    overrides = tiny_overrides(photo_data / "train", run_dir, **{"train.epochs": 200, "checkpoint.every_steps": 1000,
                                                                "train.log_every": 1, **over})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([PY, "-m", *launcher, *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int = 3, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.3)


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
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", state["mlflow_run_id"]) == "KILLED"
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
    assert out.count("SIGINT: stopping at the next step boundary") == 1, out[-3000:]  # said once, not per rank
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and f"stopped at step {state['step']}" in out
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", state["mlflow_run_id"]) == "KILLED"
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
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", state["mlflow_run_id"]) == "KILLED"


@pytest.mark.slow
@pytest.mark.parametrize("over,needle", [({"train.micro_batch": 3}, "train.micro_batch=3"),
                                         ({"train.device": "cuda"}, "train.device=cuda")],
                         ids=["micro-batch", "cuda-without-gpu"])
def test_a_user_error_inside_the_ranks_is_one_line(photo_data, tmp_path, over, needle):
    """Found by every rank after the launch: printed once, exit 2, no torchrun traceback."""
    if "train.device" in over and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = simclr("train", "--nproc", "2", *tiny_overrides(photo_data / "train", tmp_path / "run", **over))
    assert_one_line_error(proc, needle)


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(photo_data, tmp_path):
    run_dir = tmp_path / "run"
    # slow steps (bigger images and batch) so that the second Ctrl-C lands before the next step boundary
    proc = start_training(photo_data, run_dir, "trainer", **{"data.image_size": 64, "data.batch_size": 32})
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
            "from trainer.interrupts import stop_on_interrupt\n"
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
    assert run_status(uri, state["mlflow_run_id"]) == "RUNNING"  # nobody could close it
    over = {"train.epochs": 200, "train.log_every": 1, "train.stop_after_steps": state["step"] + 2}  # its own schedule
    resumed = train(load_config(None, tiny_overrides(photo_data / "train", run_dir, **over)))
    assert resumed.run_id == state["mlflow_run_id"]
    run = MlflowClient(uri).get_run(resumed.run_id)
    assert run.info.status == "KILLED"  # stopped at train.stop_after_steps, short of its schedule: not FINISHED
    assert run.data.tags["simclr.stopped_early"].startswith(f"at step {state['step'] + 2} of ")
    assert run.data.tags["simclr.unclean_exits"] == "1"


# ----------------------------------------------------------------------------------- 5-7. one-line user errors


def test_nproc_is_validated_before_any_rank_starts(photo_data, tmp_path):
    over = tiny_overrides(photo_data / "train", tmp_path / "run")
    assert_one_line_error(simclr("train", "--nproc", "3", *over), "--nproc 3", "data.batch_size=8")
    assert_one_line_error(simclr("train", "--nproc", "0", *over), "--nproc 0", "at least 1")


def test_cuda_without_a_gpu_is_a_user_error(photo_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = simclr("train", *tiny_overrides(photo_data / "train", tmp_path / "run", **{"train.device": "cuda"}))
    assert_one_line_error(proc, "train.device=cuda", "train.device=cpu")


def test_sync_and_make_demo_data_user_errors(tmp_path):
    assert_one_line_error(simclr("sync", str(tmp_path / "nope")), "nope", "metrics.jsonl")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "time_ms": 1, "loss": 1.0}\n')
    from trainer.distributed import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(simclr("sync", str(run_dir), "--uri", dead), "unreachable", "nothing was lost")
    assert_one_line_error(simclr("make-demo-data", "--out", str(tmp_path / "d"), "--size", "0"), "--size")
    assert_one_line_error(simclr("make-demo-data", "--out", str(tmp_path / "d"), "--train-per-class", "0"),
                          "--train-per-class")


@pytest.fixture(scope="module")
def exported_encoder(photo_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    result = train(load_config(None, tiny_overrides(photo_data / "train", run, **{"train.epochs": 1,
                                                                                   "tracking.enabled": "false"})))
    return result.encoder_path


def test_eval_names_an_architecture_mismatch(exported_encoder, photo_data, tmp_path):
    import shutil

    folder = tmp_path / "mismatch"
    folder.mkdir()
    shutil.copy(exported_encoder, folder / "encoder.pt")
    text = (exported_encoder.parent / "config.yaml").read_text().replace("arch: resnet18", "arch: resnet34")
    (folder / "config.yaml").write_text(text)
    proc = simclr("eval", "--checkpoint", str(folder / "encoder.pt"), "--train-data", str(photo_data / "train"),
                  "--val-data", str(photo_data / "val"), "--device", "cpu", "--workers", "0", "--probe-epochs", "1")
    assert_one_line_error(proc, "resnet34", "do not fit", "tensors missing")


def test_eval_recognises_an_exported_encoder_under_any_name(exported_encoder, photo_data, tmp_path):
    import shutil

    renamed = exported_encoder.parent / "rn18_photos_epoch1.pt"
    shutil.copy(exported_encoder, renamed)
    proc = simclr("eval", "--checkpoint", str(renamed), "--train-data", str(photo_data / "train"), "--val-data",
                  str(photo_data / "val"), "--device", "cpu", "--workers", "0", "--probe-epochs", "1",
                  "--no-baseline", "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval" / "report.json").exists()


# ----------------------------------------------------------------------------------- 8. input never silently mixed


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


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    from trainer.config import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.5\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="'lr' is given twice.*lines 2 and 3"):
        load_config(recipe)


# ----------------------------------------------------------------------------------- 9, 10. sync, demo data


def test_sync_replays_params_tags_name_artifacts_and_metrics(photo_data, tmp_path):
    from trainer.distributed import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(photo_data / "train", run_dir, **{
        "tracking.uri": dead, "train.epochs": 1, "tracking.run_name": "offline-run"}))
    train(cfg)
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    proc = simclr("sync", str(run_dir), "--uri", uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert run.info.run_name == "offline-run" and run.info.status == "FINISHED"
    assert run.data.params["optim.name"] == "lars" and run.data.params["world_size"] == "1"
    assert run.data.tags["simclr.device"] == "cpu"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6, 8, 10]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "encoder.pt", "curves.png"}


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


# ----------------------------------------------------------------------------------- 11. one GPU per task


@pytest.mark.parametrize("visible,local_rank,expected", [(8, 3, 3), (1, 3, 0), (1, 0, 0)])
def test_device_choice_fits_both_cluster_gpu_layouts(monkeypatch, visible, local_rank, expected):
    """All GPUs of a node visible to every task (index = LOCAL_RANK), or only the task's own one
    (CUDA_VISIBLE_DEVICES holds one device: index 0 whatever LOCAL_RANK is)."""
    from trainer.device import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert choose_device("auto", local_rank) == torch.device("cuda", expected)


def test_more_local_ranks_than_visible_gpus_is_a_user_error(monkeypatch):
    from trainer.config import ConfigError
    from trainer.device import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK=3.*2 GPUs.*CUDA_VISIBLE_DEVICES"):
        choose_device("cuda", 3)


# ----------------------------------------------------------------------------------- 12. concurrent runs, one store


def concurrent_runs(photo_data: Path, tmp_path: Path, uri: str, count: int = 4) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i in range(count):
        over = tiny_overrides(photo_data / "val", tmp_path / f"run{i}", **{  # 40 images: 5 steps
            "tracking.uri": uri, "train.epochs": 1, "train.log_every": 1, "tracking.experiment": "sweep",
            "tracking.run_name": f"point{i}", "train.seed": i, "checkpoint.every_steps": 100})
        procs.append(subprocess.Popen([PY, "-m", "trainer", *over], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    return outs


def assert_nothing_lost(uri: str, count: int = 4) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"point{i}" for i in range(count)]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.name"] == "lars" and "version.torch" in run.data.params
        for key in ("train/loss", "train/contrastive_acc", "train/lr", "perf/images_per_s"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 6)), key
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "encoder.pt",
                                                                             "curves.png"}


@pytest.mark.slow
def test_four_concurrent_runs_into_one_sqlite_store_lose_nothing(photo_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    concurrent_runs(photo_data, tmp_path, uri)
    assert_nothing_lost(uri)


@pytest.mark.slow
def test_four_concurrent_runs_into_one_server_lose_nothing(photo_data, tmp_path, mlflow_server):
    concurrent_runs(photo_data, tmp_path, mlflow_server)
    assert_nothing_lost(mlflow_server)


# ----------------------------------------------------------------------------------- a change of world size


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process_into_the_same_run(photo_data, tmp_path):
    over = {"train.epochs": 2, "train.stop_after_steps": 3}  # the val set: 5 steps an epoch
    first = simclr("train", "--nproc", "2", *tiny_overrides(photo_data / "val", tmp_path / "run", **over))
    assert first.returncode == 0, first.stderr[-3000:]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 3 and state["world_size"] == 2
    resumed = train(load_config(None, tiny_overrides(photo_data / "val", tmp_path / "run", **{"train.epochs": 2})))
    assert resumed.step == 10 and resumed.run_id == state["mlflow_run_id"]
    assert run_status(f"sqlite:///{tmp_path / 'mlflow.db'}", resumed.run_id) == "FINISHED"


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


def test_nproc_on_a_resume_names_the_rank_counts_not_a_new_batch(tiny_config, photo_data, tmp_path):
    """A resumed run cannot change its batch: the advice is the world sizes that divide it."""
    train(tiny_config(**{"train.stop_after_steps": 2, "tracking.enabled": "false"}))
    proc = simclr("train", "--nproc", "3", *tiny_overrides(photo_data / "train", tmp_path / "run",
                                                             **{"tracking.enabled": "false"}))
    assert_one_line_error(proc, "--nproc 3", "resumes with", "--nproc among 1, 2, 4, 8")
    assert "multiple of" not in proc.stderr


# ----------------------------------------------------------------------------------- nothing silently wrong


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
    from trainer.checkpoint import CheckpointError

    train(tiny_config(**{"train.stop_after_steps": 2}))
    directory = ckpt.checkpoint_dir(tiny_config().train.run_dir)
    with pytest.raises(CheckpointError, match="earlier run.*new train.run_dir.*train.overwrite=true"):
        train(tiny_config(**{"checkpoint.resume": "none", "train.stop_after_steps": 2}))
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_000000002.pt"]  # untouched
    first_run = ckpt.load_checkpoint(ckpt.list_checkpoints(directory)[0])["mlflow_run_id"]
    result = train(tiny_config(**{"checkpoint.resume": "none", "train.overwrite": "true",
                                  "train.stop_after_steps": 4}))
    assert result.step == 4 and result.run_id != first_run
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(directory)[0])
    assert state["mlflow_run_id"] == result.run_id  # the next plain resume continues the new run
    assert [r["step"] for r in tracking_rows(directory.parent)] == [2, 4]


def tracking_rows(run_dir):
    from trainer.tracking import read_metrics_file

    return [r for r in read_metrics_file(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def test_a_finished_run_run_again_says_so_and_does_nothing(tiny_config, capsys):
    from mlflow.tracking import MlflowClient

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


def test_eval_refuses_different_class_sets(exported_encoder, photo_data, tmp_path):
    import shutil

    two = tmp_path / "two"
    for name in sorted(p.name for p in (photo_data / "val").iterdir())[:2]:
        shutil.copytree(photo_data / "val" / name, two / name)
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(two), "--val-data",
                  str(photo_data / "val"))
    assert_one_line_error(proc, "classes", str(two), "same classes")
    lacking = tmp_path / "lacking"  # the held-out set lacks one class: named, not only both lists shown
    shutil.copytree(photo_data / "val", lacking)
    gone = sorted(p.name for p in lacking.iterdir())[3]
    shutil.rmtree(lacking / gone)
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(photo_data / "train"),
                  "--val-data", str(lacking))
    assert_one_line_error(proc, f"the held-out set lacks {gone!r}")


def test_eval_says_when_its_numbers_mislead(exported_encoder, photo_data, tmp_path):
    """--val-data equal to --train-data, --finetune 1e-9 (1 image per class), --probe-epochs 0 and
    --finetune-epochs 0 all reported numbers with no note; now each is a note, in the report too."""
    out = tmp_path / "eval"
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(photo_data / "train"),
                  "--val-data", str(photo_data / "train"), "--probe-epochs", "0", "--finetune", "1e-9",
                  "--finetune-epochs", "0", "--no-baseline", "--device", "cpu", "--workers", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("[simclr] note:")]
    for needle in ("the held-out set is the training set", "--probe-epochs 0", "--finetune-epochs 0",
                   "--finetune 1e-09: 1e-09 of the labels rounds to no image in 10 of 10 classes"):
        assert any(needle in note for note in notes), (needle, notes)
    assert len(notes) == 4 and (out / "report.md").read_text().count("Note: ") == 4


def test_eval_finetune_fraction_out_of_range_is_refused_before_any_work(exported_encoder, photo_data):
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(photo_data / "train"),
                  "--val-data", str(photo_data / "val"), "--finetune", "2.0")
    assert_one_line_error(proc, "--finetune 2", "(0, 1]")
    assert "linear_top1" not in proc.stdout


def test_a_batch_of_one_is_refused_and_fp16_on_the_cpu_is_warned(tiny_config, capsys):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="data.batch_size.*at least 2.*no negatives"):
        tiny_config(**{"data.batch_size": 1})
    train(tiny_config(**{"precision.dtype": "fp16", "train.stop_after_steps": 1, "tracking.enabled": "false"}))
    assert capsys.readouterr().out.count("fp16 on the CPU runs about 20x slower") == 1


def test_rank_zero_says_at_start_where_the_run_writes_what_it_reads_and_where_to_watch(tiny_config, capsys,
                                                                                        monkeypatch):
    result = train(tiny_config(**{"train.stop_after_steps": 2}))
    out = capsys.readouterr().out
    assert f"[simclr] run folder {result.run_dir} (new run; 20 steps in all)" in out
    assert "80 images, 10 classes, labelled; 10 steps per epoch of 8 (1 rank(s) x 8), torchvision backend" in out
    assert f"MLflow run {result.run_id} at sqlite:///" in out and "mlflow ui --backend-store-uri" in out
    import trainer.losses.nt_xent as loss_module

    monkeypatch.setattr(loss_module, "nt_xent", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        train(tiny_config())
    err = capsys.readouterr().err
    assert f"MLflow run {result.run_id}" in err and "ended FAILED" in err  # a crash names its run


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
    assert said and all(piece.startswith("[simclr] SIGTERM") for piece in said), said
