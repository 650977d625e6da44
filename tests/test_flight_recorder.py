"""Hangs leave evidence (#35, item 5): on NCCL the flight recorder is on by default and dumps into
the run folder on a timeout; the launcher's line for a stuck or lost rank points to the dumps."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from trainer.runtime import distributed
from trainer.runtime.distributed import DistConfig, flight_recorder_env, init_distributed

NAMES = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
         "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE")


def record_init(monkeypatch) -> dict:
    """init_distributed as a rank of 2 on cuda:0 whose process group is only recorded (no NCCL, no
    GPU here): returns what the environment held when the group was made."""
    for name in NAMES:  # set, then removed: monkeypatch puts back what was there, and init's additions go
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", "1")
    seen = {}

    def init_process_group(backend, **kwargs):
        seen.update({"backend": backend, **{name: os.environ.get(name) for name in NAMES}})

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed, "choose_device", lambda preference, local_rank: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return seen


@pytest.fixture
def joined(monkeypatch):
    return record_init(monkeypatch)


def test_nccl_runs_with_the_flight_recorder_dumping_into_the_run_folder(joined, tmp_path, monkeypatch):
    init_distributed(DistConfig(backend="nccl"), "cpu", launched=True, run_dir=tmp_path / "run")
    prefix = str((tmp_path / "run").resolve() / "nccl_trace_rank_")
    # today's names only: the TORCH_NCCL_* aliases print a deprecation warning on every rank (torch 2.14)
    assert joined == {"backend": "nccl", "TORCH_NCCL_TRACE_BUFFER_SIZE": None, "TORCH_FR_BUFFER_SIZE": "2000",
                      "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": None,
                      "TORCH_FR_DUMP_TEMP_FILE": prefix}


def test_gloo_or_a_setting_of_the_user_is_left_alone(joined, tmp_path, monkeypatch):
    init_distributed(DistConfig(backend="gloo"), "cpu", launched=True, run_dir=tmp_path)
    assert joined["backend"] == "gloo" and all(joined[name] is None for name in NAMES)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")  # the user's own wins, under the old name too
    init_distributed(DistConfig(backend="nccl"), "cpu", launched=True, run_dir=tmp_path)
    assert joined["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50" and joined["TORCH_FR_BUFFER_SIZE"] is None
    assert joined["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert flight_recorder_env(tmp_path, 0) == {}  # dist.flight_recorder_entries=0: off


def test_nothing_is_left_in_the_environment_of_later_tests(tmp_path):
    """init writes os.environ; within a test's monkeypatch nothing of it reaches the next test's ranks
    (CI: torch's deprecation warning in another test's output)."""
    with pytest.MonkeyPatch.context() as mp:
        record_init(mp)
        init_distributed(DistConfig(backend="nccl"), "cpu", launched=True, run_dir=tmp_path)
        assert os.environ["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert not any(name in os.environ for name in NAMES)


def test_nccl_on_cpu_ranks_is_refused_before_the_group_is_made(joined, monkeypatch):
    """torch's own refusal is a ValueError traceback from every rank, about device_id."""
    from trainer.runtime.dataclass_yaml import ConfigError

    monkeypatch.setattr(distributed, "choose_device", lambda preference, local_rank: torch.device("cpu"))
    with pytest.raises(ConfigError, match="dist.backend=nccl moves CUDA tensors only.*no CUDA device is visible"):
        init_distributed(DistConfig(backend="nccl"), "auto", launched=True)
    assert joined == {}


def test_the_stuck_rank_line_points_to_the_dumps(tmp_path, caplog):
    from launch.local import JobContext, report_death

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = JobContext("training", f"simclr train train.run_dir={run_dir}", run_dir)
    with caplog.at_level(logging.WARNING, logger="simclr"):
        report_death([0, 0], {0: 1.0, 1: 1.0}, {1: "T"}, tmp_path / "errors", job)
    assert "rank 1 stopped answering" in caplog.text and "flight recorder" not in caplog.text  # gloo: no dumps
    for rank in (0, 1):
        (run_dir / f"nccl_trace_rank_{rank}").write_bytes(b"pickle")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simclr"):
        report_death([-6, None], {0: 1.0, 1: 2.0}, {1: "T"}, tmp_path / "errors", job)
    (line,) = [r.getMessage() for r in caplog.records]  # rank 0's SIGABRT: NCCL's watchdog, after the timeout
    assert line.startswith("rank 1 stopped answering"), line
    assert f"NCCL's flight recorder dumped what each rank last ran in {run_dir}/nccl_trace_rank_*" in line
    assert f"torchfrtrace {run_dir} -p nccl_trace_rank_" in line
