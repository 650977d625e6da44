"""The GPU proof is rehearsed here exactly as the GPU machine runs it (``benchmarks.gpu_pack
rehearse``): the dry plan's calls, as printed, in a copy of the tree as it travels (no .git, no
.venv), with MLflow and submitit unimportable and $OUT an empty folder. What $OUT holds afterwards
must pass the rules of what comes back from that machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.gpu_pack import Call, make_calls
from benchmarks.gpu_proof import (
    MAX_DEPTH,
    MAX_FILE_MB,
    MAX_FILES,
    RETURNABLE_NAME,
    TOTAL_CAP_S,
    plan_quality,
    returnable_problems,
)
from tests.helpers.runs import PY, REPO

STAGES = ["gpu_tests", "feed_cifar10_resnet18", "feed_imagenette_resnet50", "feed_imagenette_resnet50_multicrop",
          "quality_cifar10"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rehearsal")
    proc = subprocess.run([PY, "-m", "benchmarks.gpu_pack", "rehearse", "--root", str(root)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((root / "report.json").read_text())


@pytest.mark.slow
def test_rehearsed_proof_returns_every_stage_evidence_in_out(rehearsal):
    calls, out, machine = rehearsal["calls"], Path(rehearsal["out"]), Path(rehearsal["machine"])
    assert len(calls) >= 2 and all(c["rc"] == 0 for c in calls), calls[-1]["output"][-3000:]  # parts joined
    assert not (machine / ".git").exists() and not (machine / ".venv").exists()
    # the blocker holds in the copy: MLflow and submitit cannot be imported there, as on the GPU image
    env = {**os.environ, **rehearsal["env"]}
    for module in ("mlflow", "submitit"):
        probe = subprocess.run(["python3", "-c", f"import {module}"], cwd=machine, env=env, capture_output=True,
                               text=True)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, (module, probe.stderr[-500:])
    # the rules of what comes back, each checked here as well as by returnable_problems
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES and returnable_problems(out) == []
    for f in files:
        rel = f.relative_to(out)
        assert f.stat().st_size <= MAX_FILE_MB * 2**20 and len(rel.parts) - 1 <= MAX_DEPTH
        assert all(RETURNABLE_NAME.match(part) for part in rel.parts), rel
    assert sorted(p.name for p in files) == ["feed_cifar10_resnet18.json", "feed_imagenette_resnet50.json",
                                             "feed_imagenette_resnet50_multicrop.json", "gpu_proof_cpu_dry.json",
                                             "gpu_proof_cpu_dry.log",
                                             "quality_cifar10_cpu.json"]
    summary = json.loads((out / "gpu_proof_cpu_dry.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert summary["git_commit"] == head and summary["repo"] == str(machine) and summary["dry"] is True
    assert summary["total_cap_s"] == TOTAL_CAP_S == 360 and summary["returnable_problems"] == []
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == STAGES
    # collected and skipped without MLflow (a collection error would be "failed")
    assert stages["gpu_tests"]["status"] == "skipped", stages["gpu_tests"]["output_tail"]
    for name in STAGES[1:]:
        assert stages[name]["status"] == "ok", stages[name]["output_tail"]
        assert stages[name]["outputs"] and stages[name]["planned_s"] > 0 and stages[name]["figures"], name
    log = (out / "gpu_proof_cpu_dry.log").read_text()
    assert all(f"===== {name}" in log for name in STAGES)
    console = calls[-1]["output"]
    for name in STAGES:
        assert f"[gpu-proof] {name}: planned" in console and f"[gpu-proof] {name}: " in console
    assert "views/s" in console and "linear " in console  # key figures on the console
    for name in ("feed_cifar10_resnet18", "feed_imagenette_resnet50", "feed_imagenette_resnet50_multicrop"):
        feed = json.loads((out / f"{name}.json").read_text())
        assert [r["mode"] for r in feed["rows"]] == ["e2e", "model", "loader"]
        assert feed["config"]["backend"] == "DaliLoader" and feed["git_commit"] == head
        for row in feed["rows"]:
            assert row["views_per_s"] > 0 and row["host_syncs_per_step"] == 0
            assert row["pipelines_built"] == 1  # one pipeline across the three modes
    quality = json.loads((out / "quality_cifar10_cpu.json").read_text())
    assert 0 <= quality["linear_top1"] <= 1 and "random_linear_top1" in quality and quality["epochs"] >= 1


@pytest.mark.slow
def test_a_failed_stage_shows_its_last_lines_and_a_killed_proof_keeps_its_summary(rehearsal, tmp_path):
    """CIFAR-10 missing: stage 2 fails and its last lines reach the console; the proof is then
    killed during stage 3, and the summary still holds the two stages that finished. A rerun of
    the failed stage alone (--stages) then passes."""
    machine, data = Path(rehearsal["machine"]), tmp_path / "data"
    shutil.copytree(Path(rehearsal["env"]["SIMCLR_GPU_TMP"]) / "data", data)
    shutil.rmtree(data / "cifar10-jpeg")
    out = tmp_path / "OUT"
    out.mkdir()
    env = {**os.environ, **rehearsal["env"], "OUT": str(out), "OMP_NUM_THREADS": "1"}
    console = tmp_path / "console.txt"
    with open(console, "w") as f:
        proc = subprocess.Popen(["python3", "-m", "benchmarks.gpu_proof", "--dry", "--data", str(data), "--work",
                                 str(tmp_path / "work")], cwd=machine, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
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
        ("gpu_tests", "skipped"), ("feed_cifar10_resnet18", "failed")]
    assert returnable_problems(out) == []
    assert not (out / "feed_imagenette_resnet50.json").exists()
    # the rerun of the failed stage alone, once its data is there
    shutil.rmtree(out)
    out.mkdir()
    rerun = subprocess.run(["python3", "-m", "benchmarks.gpu_proof", "--dry", "--stages", "feed_cifar10_resnet18",
                            "--data", str(Path(rehearsal["env"]["SIMCLR_GPU_TMP"]) / "data"), "--work",
                            str(tmp_path / "work2")], cwd=machine, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    summary = json.loads(summary_path.read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("feed_cifar10_resnet18", "ok")]


def test_return_rules_name_every_breach(tmp_path):
    for i in range(MAX_FILES + 1):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.json").write_text("{}")
    (tmp_path / "bad name.txt").write_text("")
    with open(tmp_path / "big.log", "wb") as f:
        f.truncate(17 * 2**20)
    problems = "\n".join(returnable_problems(tmp_path))
    assert "over 8" in problems and "more than 2 folders down" in problems and "bad name.txt" in problems
    assert "big.log: 17.0 MiB" in problems


def test_quality_stage_is_sized_from_everything_it_runs():
    """Epochs fill the budget with the online probe's validation passes, both encoders' features and
    probes, and the start-up counted; a slower machine gets fewer epochs, never an overrun."""
    fast = plan_quality(25_000, 50_000, 10_000, 100, budget_s=136)
    slow = plan_quality(5_000, 50_000, 10_000, 100, budget_s=136)
    for p in (fast, slow):
        assert p.total_s <= 136 and p.val_pass_s > 0 and p.eval_s > 0 and p.fixed_s > 0
    assert fast.epochs > slow.epochs >= 1
    assert fast.total_s + fast.epoch_s + fast.val_pass_s > 136  # one more epoch would not fit


def test_every_planned_call_fits_what_a_call_may_carry():
    parts = [(f".gpu_part_{k}", 60 * 2**20) for k in range(1, 6)] + [(".gpu_part_6", 7 * 2**20)]
    calls = make_calls(parts, tree=1.0, proof_mib=0.01, proof_cap_s=TOTAL_CAP_S, dry=False)
    assert all(isinstance(c, Call) and c.mib <= 64 for c in calls)
    assert [c.carry for c in calls][-1] == [".gpu_part_6", ".gpu_proof"]
    assert "benchmarks.gpu_pack unpack" in calls[-1].command and "--dry" not in calls[-1].command
    assert calls[-1].timeout_s >= TOTAL_CAP_S + 60 and all("gpu_proof" not in c.command for c in calls[:-1])


def test_unpack_names_a_lost_part(rehearsal, tmp_path):
    machine = Path(rehearsal["machine"])
    parts = tmp_path / "parts"
    parts.mkdir()
    plan = json.loads((machine / ".gpu_proof" / "plan.json").read_text())
    shutil.copy(machine / plan["parts"][0] / "payload.01", parts)  # the later parts went with a cold machine
    proc = subprocess.run(["python3", "-m", "benchmarks.gpu_pack", "unpack"], cwd=machine,
                          env={**os.environ, **rehearsal["env"], "SIMCLR_GPU_TMP": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "payload.02" in proc.stderr and "make every part call again" in proc.stderr


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


def test_the_gpu_plan_fits_six_minutes_and_each_stage_its_cap(tmp_path):
    import argparse

    from benchmarks.gpu_proof import plan

    stages = plan(argparse.Namespace(dry=False, data=str(tmp_path)), tmp_path / "out", tmp_path / "work")
    assert [s.name for s in stages] == STAGES and sum(s.cap_s for s in stages) <= TOTAL_CAP_S
    for stage in stages[:-1]:
        assert 0 < stage.planned_s <= stage.cap_s, stage
        assert all(str(tmp_path / "out") not in arg or arg.endswith(".json") for arg in stage.command)
    quality = stages[-1].command
    assert str(tmp_path / "work") in quality[quality.index("--run-dir") + 1]  # checkpoints stay out of $OUT
