"""The GPU proof's dry mode, run as a GPU node's install would run it: only what the proof needs
importable (MLflow and submitit are made unimportable here), every file it keeps in ``--out``.
A stage fails on a failed command, at its cap, and on a test that skipped unless it expects that
skip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.gpu_proof import dry_data, unexpected_skips
from benchmarks.gpu_proof_plan import plan_quality
from tests.helpers.runs import PY, REPO, tiny_overrides

STAGES = ["gpu_tests", "nccl_job", "kernels", "feed_cifar10_resnet18", "feed_imagenette_resnet50",
          "feed_imagenette_resnet50_multicrop", "quality_cifar10"]
ABSENT = """import importlib.abc, sys


class Absent(importlib.abc.MetaPathFinder):  # what a GPU node's install need not have
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "submitit"):
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, Absent())
"""


def proof_env(tmp_path: Path, hide_dali: bool = False) -> dict[str, str]:
    """This environment with MLflow and submitit (and DALI when asked) unimportable in every process
    the proof starts."""
    blocker = tmp_path / "absent"
    blocker.mkdir(exist_ok=True)
    names = '("mlflow", "submitit", "nvidia")' if hide_dali else '("mlflow", "submitit")'
    (blocker / "sitecustomize.py").write_text(ABSENT.replace('("mlflow", "submitit")', names))
    return {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}


def run_proof(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run([PY, "-m", "benchmarks.gpu_proof", *args], cwd=REPO, env=env or proof_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_proof(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("proof")
    before = set((REPO / "benchmarks" / "results").rglob("*"))
    proc = run_proof(root, "--dry", "--out", str(root / "out"), "--work", str(root / "work"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set((REPO / "benchmarks" / "results").rglob("*")) == before  # nothing written beside the code
    return {"out": root / "out", "work": root / "work", "console": proc.stdout, "env": proof_env(root)}


@pytest.mark.slow
def test_the_dry_proof_writes_every_stage_evidence_to_out(dry_proof):
    out, console = dry_proof["out"], dry_proof["console"]
    env = dry_proof["env"]
    for module in ("mlflow", "submitit"):  # the proof ran without them, as on a bare GPU node
        probe = subprocess.run([PY, "-c", f"import {module}"], env=env, capture_output=True, text=True)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, (module, probe.stderr[-500:])
    assert sorted(p.name for p in out.iterdir()) == [
        "feed_cifar10_resnet18.json", "feed_imagenette_resnet50.json", "feed_imagenette_resnet50_multicrop.json",
        "gpu_proof_cpu_dry.json", "gpu_proof_cpu_dry.log", "kernels_cpu.json", "nccl_job.json",
        "quality_cifar10_cpu.json"]
    summary = json.loads((out / "gpu_proof_cpu_dry.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert summary["git_commit"] == head and summary["dry"] is True
    assert summary["total_cap_s"] == sum(p["cap_s"] for p in summary["planned"])
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == STAGES
    for name in STAGES:
        assert stages[name]["status"] == "ok", stages[name]["output_tail"]
        assert stages[name]["planned_s"] > 0 and stages[name]["figures"], name
    assert "skipped" in stages["gpu_tests"]["figures"]  # collected without MLflow, skipped as expected (no CUDA)
    log = (out / "gpu_proof_cpu_dry.log").read_text()
    assert all(f"===== {name}" in log for name in STAGES)
    for name in STAGES:
        assert f"[gpu-proof] {name}: planned" in console and f"[gpu-proof] {name}: ok" in console
    assert "views/s" in console and "linear " in console  # key figures on the console
    nccl = json.loads((out / "nccl_job.json").read_text())
    assert nccl["ok"] and list(nccl["steps"]) == ["train_stopped_by_sigterm", "train_resumed", "eval", "embed"]
    assert all(step["process_group"] for step in nccl["steps"].values() if "process_group" in step)
    assert nccl["steps"]["train_stopped_by_sigterm"]["exit"] == 128 + signal.SIGTERM
    kernels = json.loads((out / "kernels_cpu.json").read_text())
    assert [r["arch"] for r in kernels["lars"]] == ["resnet18"] and kernels["git_commit"] == head
    assert {r["dtype"] for r in kernels["sync_batchnorm"]["rows"]} == {"float32"} and "missed" in kernels
    assert "SyncBatchNorm/BatchNorm2d at worst" in stages["kernels"]["figures"]
    assert kernels["checked"] is False and "(not checked at these sizes)" in stages["kernels"]["figures"]
    for name in STAGES[3:6]:
        feed = json.loads((out / f"{name}.json").read_text())
        assert [r["mode"] for r in feed["rows"]] == ["e2e", "model", "loader"]
        assert feed["config"]["backend"] == "DaliLoader" and feed["git_commit"] == head
        for row in feed["rows"]:
            assert row["views_per_s"] > 0 and row["host_syncs_per_step"] is None  # CUDA's count; the CPU has none
            assert row["pipelines_built"] == 1  # one pipeline across the three modes
    assert json.loads((out / "feed_imagenette_resnet50_multicrop.json").read_text())["config"]["views"] == \
        "2x16 + 6x8 px"
    quality = json.loads((out / "quality_cifar10_cpu.json").read_text())
    assert 0 <= quality["linear_top1"] <= 1 and "random_linear_top1" in quality and quality["epochs"] >= 1


@pytest.mark.slow
def test_a_failed_stage_shows_its_last_lines_and_a_killed_proof_keeps_its_summary(dry_proof, tmp_path):
    """CIFAR-10 missing: stage 2 fails and its last lines reach the console; the proof is then
    killed during stage 3, and the summary still holds the two stages that finished. A rerun of
    the failed stage alone (--stages) then passes."""
    data = dry_data(tmp_path / "data")
    kept = tmp_path / "cifar10-jpeg"
    shutil.move(data / "cifar10-jpeg", kept)
    out = tmp_path / "out"
    console = tmp_path / "console.txt"
    with open(console, "w") as f:
        proc = subprocess.Popen([PY, "-m", "benchmarks.gpu_proof", "--dry", "--data", str(data), "--out", str(out),
                                 "--work", str(tmp_path / "work"), "--stages", *STAGES[:1], *STAGES[3:]],
                                cwd=REPO, env=dry_proof["env"], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        summary_path, deadline = out / "gpu_proof_cpu_dry.json", time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.loads(summary_path.read_text())["stages"]) >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        assert proc.poll() is None, console.read_text()[-3000:]  # still running: stage 3 has begun
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = console.read_text()
    assert "[gpu-proof] feed_cifar10_resnet18: failed" in text, text[-3000:]
    tail = text.split("feed_cifar10_resnet18: its last", 1)[1]
    assert "cifar10-jpeg" in tail  # the error naming the missing folder, from the stage's own output
    summary = json.loads(summary_path.read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [
        ("gpu_tests", "ok"), ("feed_cifar10_resnet18", "failed")]
    assert not (out / "feed_imagenette_resnet50.json").exists()
    # the rerun of the failed stage alone, once its data is there
    shutil.move(kept, data / "cifar10-jpeg")
    shutil.rmtree(out)
    rerun = run_proof(tmp_path, "--dry", "--stages", "feed_cifar10_resnet18", "--data", str(data), "--out", str(out),
                      "--work", str(tmp_path / "work2"), env=dry_proof["env"], timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    summary = json.loads(summary_path.read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("feed_cifar10_resnet18", "ok")]


def test_a_test_stage_whose_tests_skip_fails(tmp_path):
    """A check that did not run did not pass: on a node without CUDA (here) or without DALI, the
    test stage's tests skip, and the stage fails, naming them (only dry mode expects no CUDA)."""
    out = tmp_path / "out"
    proc = run_proof(tmp_path, "--stages", "gpu_tests", "--data", str(tmp_path), "--out", str(out),
                     "--work", str(tmp_path / "work"), env=proof_env(tmp_path, hide_dali=True), timeout=300)
    (stage,) = json.loads((out / "gpu_proof_cpu.json").read_text())["stages"]
    assert stage["status"] == "failed", stage
    assert "not expected to skip: SKIPPED" in stage["output_tail"] and "needs a CUDA device" in stage["output_tail"]
    assert "[gpu-proof] gpu_tests: failed" in proc.stdout and "0/1 stages passed" in proc.stdout
    dali = "SKIPPED [1] tests/test_gpu.py:99: DALI is not installed"
    output = f"{dali}\nSKIPPED [3] tests/test_gpu.py:16: needs a CUDA device"
    assert unexpected_skips(output, ("needs a CUDA device",)) == [dali]
    assert unexpected_skips(output, ()) == output.splitlines()


def test_quality_stage_is_sized_from_everything_it_runs():
    """Epochs fill the budget with the online probe's validation passes, both encoders' features and
    probes, and the start-up counted; a slower machine gets fewer epochs, never an overrun."""
    fast = plan_quality(25_000, 50_000, 10_000, 100, budget_s=136)
    slow = plan_quality(5_000, 50_000, 10_000, 100, budget_s=136)
    for p in (fast, slow):
        assert p.total_s <= 136 and p.val_pass_s > 0 and p.eval_s > 0 and p.fixed_s > 0
    assert fast.epochs > slow.epochs >= 1
    assert fast.total_s + fast.epoch_s + fast.val_pass_s > 136  # one more epoch would not fit


def test_a_tree_without_git_names_its_commit(tmp_path, monkeypatch):
    """A tree without .git (a container image, an exported tree) names its commit through SIMCLR_GIT_COMMIT."""
    from trainer.tracking import provenance as tracking

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
                           "train.profile.steps=[1,2]", "train.profile.ranks=[0,1]",
                           "--nproc", "2", "--steps", "3", "--warmup", "1", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["ranks"] == 2
    for row in result["rows"]:
        assert row["ranks"] == 2 and row["views_per_s"] > 0 and row["host_syncs_per_step"] is None
    assert result["rows"][1]["online_probe_share"] is not None  # model mode times the probe too
    # the same profiling switch as training: each rank's trace of the e2e mode's second step, beside the result
    assert sorted(p.name for p in (tmp_path / "feed_profile").iterdir()) == [
        "rank0_steps2-2.trace.json.gz", "rank1_steps2-2.trace.json.gz"]


def test_the_gpu_plan_fits_eight_minutes_and_each_stage_its_cap(tmp_path):
    import argparse

    from benchmarks.gpu_proof import plan

    stages = plan(argparse.Namespace(dry=False, data=str(tmp_path)), tmp_path / "out", tmp_path / "work")
    assert [s.name for s in stages] == STAGES and sum(s.cap_s for s in stages) <= 480
    for stage in stages[:-1]:
        assert 0 < stage.planned_s <= stage.cap_s, stage
        assert all(str(tmp_path / "out") not in arg or arg.endswith(".json") for arg in stage.command)
    quality = stages[-1].command
    assert str(tmp_path / "work") in quality[quality.index("--run-dir") + 1]  # checkpoints stay out of --out


def test_a_feed_stage_is_resized_from_the_start_a_finished_one_measured(tmp_path):
    """The multi-crop stage's plan guessed a 20 s start; the first feed stage measured 40 s (two
    cuDNN autotunes): its plan takes the measured start and its cap grows to fit."""
    import argparse

    from benchmarks.gpu_proof import plan
    from benchmarks.gpu_proof_plan import STAGE_START_S, measured_start_s, resize_from_start

    feed = tmp_path / "feed.json"
    feed.write_text(json.dumps({"rows": [{"mode": m, "warmup_s": s} for m, s in (("e2e", 30.0), ("model", 6.0),
                                                                                 ("loader", 4.0))]}))
    assert measured_start_s(feed) == 40.0 and measured_start_s(tmp_path / "absent.json") is None
    stages = plan(argparse.Namespace(dry=False, data=str(tmp_path)), tmp_path / "out", tmp_path / "work")
    multicrop = next(s for s in stages if s.name == "feed_imagenette_resnet50_multicrop")
    planned = multicrop.planned_s
    resize_from_start(multicrop, 40.0)
    assert multicrop.planned_s == pytest.approx(planned + 40.0 - STAGE_START_S)
    assert multicrop.cap_s >= 1.25 * multicrop.planned_s


def test_a_feed_run_writes_each_modes_row_as_it_finishes(photo_data, tmp_path):
    """A stage capped after its first mode still returns that mode's row (the JSON is rewritten
    after every mode, marked partial until the last)."""
    from benchmarks import feed

    out = tmp_path / "feed.json"
    seen = []
    real_save = feed.save

    def save(*args, **kwargs):
        result = real_save(*args, **kwargs)
        seen.append(([r["mode"] for r in json.loads(out.read_text())["rows"]], result["partial"]))
        return result

    feed.save = save
    try:
        feed.main(["--steps", "1", "--warmup", "0", "--modes", "e2e", "model", "--out", str(out),
                   *tiny_overrides(photo_data / "train", tmp_path / "run")])
    finally:
        feed.save = real_save
    assert seen == [(["e2e"], True), (["e2e", "model"], True), (["e2e", "model"], False)]


def test_outside_a_checkout_the_proof_says_it_needs_one(monkeypatch, tmp_path, capsys):
    """Round 7's architecture pass: the proof ships in the wheel but its first stage runs the suite's
    tests/test_gpu.py from a checkout; installed alone it now says so before starting anything."""
    from benchmarks import gpu_proof

    monkeypatch.setattr(gpu_proof, "REPO", tmp_path)
    monkeypatch.setattr(gpu_proof, "GPU_TESTS", tmp_path / "tests" / "test_gpu.py")
    with pytest.raises(SystemExit) as stop:
        gpu_proof.main(["--dry", "--work", str(tmp_path / "work")])
    assert stop.value.code == 2 and "run it from a clone of the repository" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
