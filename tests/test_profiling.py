"""Profiler traces on demand (train.profile): a 2-rank run writes one Chrome trace per profiled rank,
holding the step's convolutions and the loss's all-gather; outside the steps nothing is recorded."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import simclr, tiny_overrides
from trainer.config import ConfigError, load_config


def test_two_ranks_write_traces_of_the_asked_steps(photo_data, tmp_path):
    run_dir = tmp_path / "run"
    over = tiny_overrides(photo_data / "val", run_dir, **{  # 40 images: 5 steps of 8
        "train.epochs": 1, "data.batch_size": 8, "train.profile.steps": "[2,4]", "train.profile.ranks": "[0,1]",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    proc = simclr("train", "--nproc", "2", *over)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "profile of steps 3-4" in proc.stdout
    names = sorted(p.name for p in (run_dir / "profile").iterdir())
    assert names == ["rank0_steps3-4.trace.json.gz", "rank1_steps3-4.trace.json.gz"]
    for name in names:
        events = json.loads(gzip.decompress((run_dir / "profile" / name).read_bytes()))["traceEvents"]
        ops = [e.get("name", "") for e in events]
        assert "aten::convolution" in ops and "aten::convolution_backward" in ops
        assert "_GatherWithGrad" in ops and any("all_gather" in op or "allgather" in op for op in ops)
        assert ops.count("Optimizer.step#LARS.step") == 2  # steps 3 and 4, no more
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert "profile/rank0_steps3-4.trace.json.gz" in {a.path for a in client.list_artifacts(run.info.run_id, "profile")}


@pytest.mark.parametrize("steps", ["[3]", "[4,2]", "[-1,2]"])
def test_a_profile_window_that_is_not_start_before_end_is_refused(steps):
    with pytest.raises(ConfigError, match=r"train.profile.steps.*\[START, END\]"):
        load_config(None, [f"train.profile.steps={steps}"])


def test_a_profile_window_outside_the_job_says_so(tiny_config, caplog):
    """[2, 4] on a 2-step run recorded nothing and said nothing."""
    import logging

    from trainer.run.loop import train

    cfg = tiny_config(**{"train.stop_after_steps": 2, "train.profile.steps": "[2,4]", "train.profile.ranks": "[0, 3]"})
    with caplog.at_level(logging.WARNING, logger="simclr"):
        train(cfg)
    assert "train.profile.steps=[2, 4] is not within this job's steps 1..2: nothing will be profiled" in caplog.text
    # round 7, F37: a rank the job does not have was silent
    assert "train.profile.ranks=[0, 3]: this job has 1 rank(s) (0..0), so rank(s) [3] record nothing" in caplog.text
    assert not (Path(cfg.train.run_dir) / "profile").exists()


def test_a_file_in_the_way_of_the_traces_costs_the_trace_not_the_run(tiny_config, caplog):
    """Round 7, F39: a file named ``profile`` in the run folder killed a profiled run with a
    FileExistsError traceback (MLflow FAILED, no checkpoint). Now one warning, and the run ends whole."""
    import logging

    from trainer.run.loop import train

    cfg = tiny_config(**{"train.stop_after_steps": 4, "train.profile.steps": "[1,2]"})
    Path(cfg.train.run_dir).mkdir(parents=True)
    (Path(cfg.train.run_dir) / "profile").write_text("x")
    with caplog.at_level(logging.WARNING, logger="simclr"):
        result = train(cfg)
    assert result.step == 4 and (Path(cfg.train.run_dir) / "checkpoints").is_dir()
    (said,) = [r.message for r in caplog.records if "was not written" in r.message]
    assert said.startswith("the profiler's trace of steps 2-2 (train.profile) was not written (File exists: ")
    assert said.endswith("profile); training goes on") and (Path(cfg.train.run_dir) / "profile").read_text() == "x"


def test_a_full_disk_when_the_trace_is_written_costs_the_trace_not_the_run(tiny_config, caplog, monkeypatch):
    """Round 7, F40: ``No space left on device`` while writing the trace killed the run."""
    import errno
    import logging

    from trainer.observe import profiling
    from trainer.run.loop import train

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(profiling, "atomic_write", full)
    cfg = tiny_config(**{"train.stop_after_steps": 3, "train.profile.steps": "[0,1]"})
    with caplog.at_level(logging.WARNING, logger="simclr"):
        result = train(cfg)
    assert result.step == 3
    assert any("the profiler's trace of steps 1-1 (train.profile) was not written (No space left on device: "
               in r.message for r in caplog.records), caplog.text


def test_a_run_stopped_inside_the_window_keeps_its_steps_and_a_resume_records_the_rest(tiny_config, caplog):
    """Round 7, F38: a stop inside the profiled window wrote nothing and said nothing, and the resume
    called the window "not within this job's steps" though it overlapped them."""
    import logging

    from trainer.run.loop import train

    with caplog.at_level(logging.INFO, logger="simclr"):
        first = train(tiny_config(**{"train.profile.steps": "[2,9]", "train.stop_after_steps": 5}))
        run_dir = Path(first.run_dir)
        assert first.step == 5 and sorted(p.name for p in (run_dir / "profile").iterdir()) == [
            "rank0_steps3-5.trace.json.gz"]
        assert "profile of steps 3-5 (the run stopped inside train.profile.steps=[2, 9]" in caplog.text
        caplog.clear()
        second = train(tiny_config(**{"train.profile.steps": "[2,9]"}))  # resumed at step 5: records 6..9
    assert second.step == 20 and "overlaps this job's steps 6..20: steps 6-9 will be profiled" in caplog.text
    assert "rank0_steps6-9.trace.json.gz" in {p.name for p in (run_dir / "profile").iterdir()}
    assert "not within" not in caplog.text
