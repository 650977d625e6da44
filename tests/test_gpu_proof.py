"""``make gpu-proof`` cannot rot: its dry mode runs every stage at tiny sizes on the CPU and writes
the summary a GPU run writes (same schema, same stages)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.runs import PY, REPO


@pytest.mark.slow
def test_gpu_proof_dry_mode_runs_every_stage(tmp_path):
    proc = subprocess.run([PY, "-m", "benchmarks.gpu_proof", "--dry", "--out", str(tmp_path)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_proof_cpu_dry.json").read_text())
    assert summary["git_commit"] not in ("", "unknown", "HEAD") and summary["dry"] is True
    assert summary["total_cap_s"] == 480 and sum(s["cap_s"] for s in summary["stages"]) <= 480
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["gpu_tests", "feed_cifar10_resnet18", "feed_imagenette_resnet50", "quality_cifar10"]
    assert stages["gpu_tests"]["status"] == "skipped"  # no CUDA here: every GPU test skips itself
    for name in ("feed_cifar10_resnet18", "feed_imagenette_resnet50", "quality_cifar10"):
        assert stages[name]["status"] == "ok", stages[name]["output_tail"]
        assert stages[name]["outputs"], name
    feed = json.loads((tmp_path / "feed_cifar10_resnet18.json").read_text())
    assert [r["mode"] for r in feed["rows"]] == ["e2e", "model", "loader"]
    assert feed["config"]["backend"] == "DaliLoader" and feed["git_commit"] == summary["git_commit"]
    for row in feed["rows"]:
        assert row["views_per_s"] > 0 and row["host_syncs_per_step"] == 0
    quality = json.loads((tmp_path / "quality_photos_cpu.json").read_text())
    assert 0 <= quality["linear_top1"] <= 1 and "random_linear_top1" in quality


def test_the_commit_travels_to_a_copy_without_git(tmp_path, monkeypatch):
    """The GPU machine's copy has no .git: the results name the commit the tree was packed from."""
    from trainer import tracking

    monkeypatch.setattr(tracking.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", ""))
    monkeypatch.setenv("SIMCLR_GIT_COMMIT", "0123abcd" * 5)
    assert tracking.git_commit() == "0123abcd" * 5
    monkeypatch.delenv("SIMCLR_GIT_COMMIT")
    assert tracking.git_commit() == "unknown"


@pytest.mark.slow
def test_feed_benchmark_on_two_ranks_reports_the_worst_rank(photo_data, tmp_path):
    out = tmp_path / "feed.json"
    proc = subprocess.run([PY, "-m", "benchmarks.feed", "--config", "configs/cifar10_resnet18.yaml",
                           f"data.root={photo_data / 'train'}", "data.backend=dali", "data.num_workers=1",
                           "train.device=cpu", "precision=fp32", "data.batch_size=16", "data.image_size=16",
                           "--nproc", "2", "--steps", "3", "--warmup", "1", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["ranks"] == 2
    for row in result["rows"]:
        assert row["ranks"] == 2 and row["views_per_s"] > 0 and row["host_syncs_per_step"] == 0
    assert result["rows"][1]["online_probe_share"] is not None  # model mode times the probe too
