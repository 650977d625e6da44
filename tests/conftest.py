"""Shared fixtures: a small real-photo dataset (made from images shipped with scikit-image and
scikit-learn) and a tiny config that trains in seconds on the CPU. Nothing here imports MLflow or
submitit at collection: the GPU proof runs tests/test_gpu.py where neither is installed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One compute thread per process, set before torch loads: the suite runs on two xdist workers on
# two cores, and more OpenMP threads than cores spin while they wait.
# The subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from foundation.logs import configure  # noqa: E402
from tests.helpers.runs import tiny_overrides  # noqa: E402
from trainer.config import Config, load_config  # noqa: E402
from trainer.runtime.distributed import free_port  # noqa: E402

configure()  # the suite is an entry point: in-process runs say their lines as the simclr command's do


def pytest_report_header(config) -> str:
    # a full disk fails checkpoints in many tests at once; this line makes that cause plain in a CI log
    import shutil
    import tempfile

    free_gb = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return f"free disk under {tempfile.gettempdir()}: {free_gb:.1f} GiB (the suite needs about 4)"


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (``make test``) the tests that use a module-scoped fixture (a trained run:
    up to a minute to build) go first, so that no such module is left to run alone at the end while
    the other worker idles. (Not ``--dist loadgroup``: with xdist 3.8 and pytest 9.2 its groups do
    not form.)"""
    if not config.pluginmanager.hasplugin("xdist"):  # the GPU image has no xdist
        return

    def uses_a_module_fixture(item) -> bool:
        info = getattr(item, "_fixtureinfo", None)
        return bool(info) and any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values())

    items.sort(key=lambda item: not uses_a_module_fixture(item))


@pytest.fixture(scope="session")
def photo_data(tmp_path_factory) -> Path:
    """``train/`` and ``val/`` ImageFolder JPEG trees (10 classes) plus ``train.npz`` / ``val.npz``."""
    from data_pipeline.sample_data import make_demo_dataset

    out = tmp_path_factory.mktemp("photos")
    make_demo_dataset(out, size=32, train_per_class=8, val_per_class=4, seed=1)
    return out


@pytest.fixture(scope="session")
def two_local_ranks_20_steps(photo_data, tmp_path_factory) -> dict:
    """The newest checkpoint of the tiny run trained uninterrupted for 20 steps (2 epochs) by
    ``simclr train --nproc 2``: the reference that the SLURM jobs (one node, two nodes, pre-empted
    or not) must match. Checkpoint frequency and the tracking store do not change the weights, so
    one run serves them all."""
    from trainer.state import checkpoint as ckpt

    root = tmp_path_factory.mktemp("reference_two_ranks")
    proc = subprocess.run([sys.executable, "-m", "launch", "train", "--nproc", "2",
                           *tiny_overrides(photo_data / "train", root / "ref", **{"train.epochs": 2})],
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "ref"))


@pytest.fixture
def tiny_config(photo_data, tmp_path):
    def make(**extra) -> Config:
        return load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **extra))

    return make


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
    from mlflow.tracking import MlflowClient  # here, not at the top: the GPU machine's image has no MLflow

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
