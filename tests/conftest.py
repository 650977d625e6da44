"""Shared fixtures: a small real-photo dataset (made from images shipped with scikit-image and
scikit-learn) and a tiny config that trains in seconds on the CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainer.config import Config, load_config
from trainer.distributed import free_port, torchrun_command

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def pytest_report_header(config) -> str:
    # a full disk fails checkpoints in many tests at once; this line makes that cause plain in a CI log
    import shutil
    import tempfile

    free_gb = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return f"free disk under {tempfile.gettempdir()}: {free_gb:.1f} GiB (the suite needs about 4)"


@pytest.fixture(scope="session")
def photo_data(tmp_path_factory) -> Path:
    """``train/`` and ``val/`` ImageFolder JPEG trees (10 classes) plus ``train.npz`` / ``val.npz``."""
    from data_pipeline.sample_data import make_demo_dataset

    out = tmp_path_factory.mktemp("photos")
    make_demo_dataset(out, size=32, train_per_class=8, val_per_class=4, seed=1)
    return out


def tiny_overrides(data_root: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "model.arch": "resnet18", "model.cifar_stem": "true", "model.proj_hidden_dim": 32, "model.proj_out_dim": 16,
        "data.root": str(data_root), "data.backend": "torchvision", "data.image_size": 16, "data.batch_size": 8,
        "data.num_workers": 0, "data.augment.blur_prob": 0.5,
        "optim.lr": 0.5, "optim.warmup_epochs": 1, "loss.temperature": 0.2,
        "train.epochs": 2, "train.device": "cpu", "train.run_dir": str(run_dir), "train.log_every": 2,
        "train.progress_bar": "false", "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
        "tracking.uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}",
        # each costs seconds per run; test_tracking turns them on where they are the subject
        "tracking.log_model": "false", "tracking.system_metrics": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_config(photo_data, tmp_path):
    def make(**extra) -> Config:
        return load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **extra))

    return make


# the broken files users have: an empty file, a JPEG cut short (an interrupted copy), and something else
BAD_FILES = {"zero_byte": b"", "truncated_jpeg": b"\xff\xd8\xff\xe0 truncated garbage",
             "not_an_image": b"%PDF-1.4 this is not an image"}


def corrupt_copy(photo_data: Path, tmp_path: Path, class_name: str, index: int, junk: bytes) -> tuple[Path, Path]:
    """A copy of the training tree in which one image is replaced by ``junk`` bytes."""
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    bad = sorted((root / class_name).iterdir())[index]
    bad.write_bytes(junk)
    return root, bad


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240, env_extra: dict | None = None):
    """Run ``tests/helpers/<script>`` under real torchrun (gloo, CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    cmd = torchrun_command(nproc, [str(REPO / "tests" / "helpers" / script), *args])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/db.sqlite",
                             "--artifacts-destination", str(root / "artifacts")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            MlflowClient(uri).search_experiments()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start")
            time.sleep(1)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
