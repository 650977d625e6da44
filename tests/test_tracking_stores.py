"""Tracking stores under load and after the fact: simclr sync replays a run folder whole, and four
runs logging at once into one sqlite store or one server lose nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import PY, REPO, simclr, tiny_overrides
from trainer.config import load_config
from trainer.run.loop import train


def test_sync_replays_params_tags_name_artifacts_and_metrics(photo_data, tmp_path):
    from trainer.runtime.distributed import free_port

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
