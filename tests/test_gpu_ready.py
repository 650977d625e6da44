"""Bugs a first GPU run would hit, each caught here on the CPU."""

from __future__ import annotations

import types

import pytest
import torch
import torchvision
from torch import nn

from tests.helpers.runs import tiny_overrides
from trainer.config import ConfigError, ModelConfig


def test_two_ranks_on_a_one_gpu_box_is_one_line_before_any_rank_starts(photo_data, tmp_path, monkeypatch):
    """NCCL refuses two ranks on one GPU ("duplicate GPU") only after both have started."""
    from launch.cli import build_parser, cmd_train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started = []
    monkeypatch.setattr("launch.local.run_local_ranks", lambda *a, **k: started.append(a) or 0)
    args = build_parser().parse_args(["train", "--nproc", "2", *tiny_overrides(photo_data / "train", tmp_path / "r",
                                                                               **{"train.device": "auto"})])
    with pytest.raises(ConfigError, match="--nproc 2.*only 1 GPU.*--nproc 1"):
        cmd_train(args)
    assert not started
    # CPU ranks, or gloo on purpose, may share the box
    for extra in ({"train.device": "cpu"}, {"dist.backend": "gloo"}):
        args = build_parser().parse_args(["train", "--nproc", "2", *tiny_overrides(photo_data / "train",
                                                                                   tmp_path / "r", **extra)])
        assert cmd_train(args) == 0
    assert len(started) == 2


def test_scaling_benchmark_refuses_more_ranks_than_gpus(monkeypatch):
    from benchmarks.scaling import bench_scaling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--nproc 2"):
        bench_scaling([1, 2], "resnet18", 16, 8, 1)


def test_the_mlflow_encoder_of_a_synced_model_is_a_plain_torchvision_resnet(tmp_path, monkeypatch):
    """The model of a multi-GPU run holds SyncBatchNorm layers with a process group (a subgroup with
    model.sync_bn_group_size > 0): deep-copying that group raised at the end of a finished run."""
    import mlflow
    import mlflow.pytorch
    import torch.distributed as dist

    from trainer.evaluation.export import log_encoder_model
    from trainer.model.simclr import SimCLRModel
    from trainer.model.sync_batchnorm import convert_sync_batchnorm

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = convert_sync_batchnorm(SimCLRModel(ModelConfig(arch="resnet18")), dist.new_group([0]))
        logged = {}
        monkeypatch.setattr(mlflow.pytorch, "log_model", lambda model, **kw: logged.update(model=model, **kw))
        monkeypatch.setattr(mlflow, "set_experiment", lambda **kw: None)
        experiment = types.SimpleNamespace(info=types.SimpleNamespace(experiment_id="0"))
        store = f"sqlite:///{tmp_path}/mlflow.db"
        run = types.SimpleNamespace(flush=lambda force=False: True, uri=store, client_uri=store, run_id="run",
                                    client=types.SimpleNamespace(get_run=lambda run_id: experiment))
        assert log_encoder_model(run, model.encoder, 32) == "runs:/run/encoder"
    finally:
        dist.destroy_process_group()
    assert logged["signature"] is not None and logged["input_example"].shape == (1, 3, 32, 32)
    encoder = logged["model"]
    assert type(encoder) is torchvision.models.ResNet
    norms = {type(m) for m in encoder.modules() if "Norm" in type(m).__name__}
    assert norms == {nn.BatchNorm2d}
    assert not encoder.training
    torchvision.models.resnet18().load_state_dict({**encoder.state_dict(), "fc.weight": torch.zeros(1000, 512),
                                                   "fc.bias": torch.zeros(1000)})


def test_pipeline_benchmark_with_fewer_batches_than_its_warmup_says_why(photo_data):
    """80 photos at 32 images per batch: 2 batches, fewer than the 3 warm-up batches. It crashed on
    an empty StopIteration message, and at a batch just under that limit timed 0 batches (0 img/s)."""
    from benchmarks.pipeline import compare_loaders

    row = compare_loaders(photo_data / "train", 16, 32, 0, 5, torch.device("cpu"))
    assert row["torchvision"] is None and "too few to time" in row["torchvision_error"]
    assert "at most 20" in row["torchvision_error"]
    ok = compare_loaders(photo_data / "train", 16, 20, 0, 5, torch.device("cpu"))
    assert ok["torchvision"] > 0


def test_model_compile_trains_and_checkpoints_plain_weights(tiny_config):
    """model.compile=true: torch.compile of encoder + head (inductor: needs a C++ compiler on the CPU)."""
    import shutil

    from tests.helpers.runs import final_state
    from trainer.run.loop import train

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler (g++), which this machine lacks")
    cfg = tiny_config(**{"model.compile": "true", "train.stop_after_steps": 2, "tracking.enabled": "false"})
    result = train(cfg)
    assert result.step == 2 and torch.isfinite(torch.tensor(result.loss))
    state = final_state(cfg.train.run_dir)
    assert not any("_orig_mod" in k for k in state["model"])  # the checkpoint holds the plain model's keys


def test_ddp_broadcasts_buffers_only_when_batchnorm_is_not_synced_over_the_world(monkeypatch):
    """With SyncBatchNorm over every rank the running statistics are equal everywhere: DDP's
    per-forward buffer broadcast is skipped (NVIDIA's ResNet-50 setting)."""
    from trainer.config import config_from_dict
    from trainer.run import parts as parts_module
    from trainer.runtime.distributed import DistInfo

    seen = []
    monkeypatch.setattr(parts_module, "DistributedDataParallel",
                        lambda model, **kwargs: seen.append(kwargs["broadcast_buffers"]) or model)
    monkeypatch.setattr(parts_module, "build_model", lambda *a, **k: nn.Linear(2, 2))
    info = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), distributed=True)
    for model in ({"sync_bn": True}, {"sync_bn": True, "sync_bn_group_size": 2}, {"sync_bn": False}):
        parts_module.build_model_parts(config_from_dict({"model": model}), info, lr=0.1)
    assert seen == [False, True, True]
