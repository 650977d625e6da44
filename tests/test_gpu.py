"""Checks that need a CUDA device; skipped elsewhere (CI has no GPU). Run on a GPU node by the GPU
proof (``python3 -m benchmarks.gpu_proof``): SyncBatchNorm numerics on CUDA, no host sync in the steady-state step under
CUDA's sync debug mode, the DALI GPU pipeline (one per run), bf16 + channels_last training."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import run_torchrun
from trainer.run.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_syncbn_two_ranks_equal_batchnorm_on_the_whole_batch(tmp_path):
    proc = run_torchrun("syncbn_numerics.py", str(tmp_path / "r.json"), "cuda")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world"] == 2 and r["converted"] == "SyncBatchNorm"
    for step in ("step0", "step1"):
        assert r[step]["xgrad_scale"] > 1e-3
        for key in ("out_diff", "xgrad_diff", "fgrad_diff", "param_grad_diff"):
            assert r[step][key] < 1e-4, (step, key, r)
    for key in ("running_mean_diff", "running_var_diff", "running_1d_diff"):
        assert r[key] < 1e-4, (key, r)


# (bf16 cannot hold 1e4 + N(0, 1): 8 bits of mantissa, so the large mean is checked in fp32 only)
@pytest.mark.parametrize(("dtype", "mean"), [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float32, 1e4)])
def test_syncbn_on_a_one_rank_nccl_group_equals_batchnorm_with_the_fused_kernels(dtype, mean):
    """torch's fused CUDA batch-norm kernels under our all-reduces (a real NCCL group of one rank):
    values and gradients as BatchNorm's over the batch, a mean of 1e4 with a std of 1 included."""
    from tests.helpers.syncbn_compare import one_rank_process_group, syncbn_against_plain

    x = (torch.randn(16, 32, 8, 8, generator=torch.Generator().manual_seed(0)) + mean).to("cuda", dtype)
    with one_rank_process_group("nccl"):
        diffs = syncbn_against_plain(x)
    bound = 2e-2 if mean > 1 else (1e-4 if dtype == torch.float32 else 5e-2)
    assert all(v < bound for v in diffs.values()), diffs


@pytest.mark.parametrize("extra", [{"precision.dtype": "bf16"}, {"precision.dtype": "fp16"},
                                   {"precision.dtype": "bf16", "train.micro_batch": 4}],
                         ids=["bf16", "fp16", "bf16_grad_cache"])
def test_no_host_sync_in_the_steady_state_step_under_cuda_sync_debug(tiny_config, extra):
    """CUDA itself raises on any synchronising call inside the counted window of steps."""
    import trainer.run.loop as loop

    cfg = tiny_config(**{"train.device": "cuda", "data.backend": "torchvision", "train.log_every": 4,
                         "train.stop_after_steps": 9, "checkpoint.every_steps": 100, "tracking.enabled": "false",
                         **extra})
    real, calls = loop.train_step, [0]

    def strict_step(*args, **kwargs):
        calls[0] += 1
        steady = 5 <= calls[0] < 8  # between the log windows of steps 4 and 8
        torch.cuda.set_sync_debug_mode("error" if steady else "default")
        try:
            return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    loop.train_step = strict_step
    try:
        result = train(cfg)
    finally:
        loop.train_step = real
    assert result.step == 9 and calls[0] == 9


def test_cuda_training_bf16_channels_last(tiny_config):
    """Also the CUDA side of #35: the step clock's events read at log steps, the profiler's trace
    with GPU activity and its memory snapshot."""
    from trainer.runtime.run_files import read_jsonl

    cfg = tiny_config(**{"train.device": "cuda", "precision.dtype": "bf16", "train.stop_after_steps": 4,
                         "tracking.enabled": "false", "data.backend": "torchvision", "checkpoint.every_steps": 100,
                         "train.profile.steps": "[2,3]"})
    result = train(cfg)
    assert result.step == 4 and torch.isfinite(torch.tensor(result.loss))
    rows = read_jsonl(f"{cfg.train.run_dir}/ranks.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    for name in ("own_ms", "loss_ms", "backward_ms", "own_backward_ms", "optimizer_ms", "own_work_ms_p50"):
        assert all(r[name] > 0 for r in rows), (name, rows)  # CUDA events: device time, > 0
    profile = sorted(p.name for p in (Path(cfg.train.run_dir) / "profile").iterdir())
    assert profile == ["rank0_steps3-3.memory.pickle", "rank0_steps3-3.trace.json.gz"]


def test_dali_gpu_pipeline_outputs_on_the_gpu(photo_data):
    """device='mixed' decoding (nvJPEG) and GPU augmentation; batches arrive as CUDA tensors."""
    pytest.importorskip("nvidia.dali")
    from data_pipeline import build_loader, resolve_backend
    from data_pipeline.config import DataConfig

    cfg = DataConfig(root=str(photo_data / "train"), backend="auto", image_size=24, batch_size=16, num_workers=2)
    assert resolve_backend(cfg, torch.device("cuda", 0)) == "dali"  # the default on CUDA machines
    loader = build_loader(cfg, 0, 0, 1, torch.device("cuda", 0))
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch == 5
    (pair,), y = batches[0]
    v1, v2 = pair
    assert v1.is_cuda and v2.is_cuda and y.is_cuda
    assert v1.shape == (16, 3, 24, 24) and v1.dtype == torch.float32 and not torch.equal(v1, v2)
    cpu = build_loader(DataConfig(**{**cfg.__dict__, "backend": "dali"}), 0, 0, 1, torch.device("cpu"))
    assert [b[1].tolist() for b in cpu] == [b[1].cpu().tolist() for b in batches]  # same order, GPU or CPU
    for epoch in (1, 2):  # later epochs come from the same pipeline
        loader.set_epoch(epoch)
        assert len(list(loader)) == 5
    assert loader.pipelines_built == 1


def test_cuda_training_with_dali_backend(tiny_config):
    pytest.importorskip("nvidia.dali")
    cfg = tiny_config(**{"train.device": "cuda", "precision.dtype": "bf16", "train.stop_after_steps": 6,
                         "tracking.enabled": "false", "data.backend": "dali", "checkpoint.every_steps": 100})
    result = train(cfg)
    assert result.step == 6 and torch.isfinite(torch.tensor(result.loss))


def test_dali_on_device_arrays_stay_on_the_gpu(photo_data):
    """data.on_device: the .npz set is uploaded once and batches are gathered and augmented on the GPU."""
    pytest.importorskip("nvidia.dali")
    from data_pipeline import build_loader
    from data_pipeline.config import DataConfig

    cfg = DataConfig(root=str(photo_data / "train.npz"), backend="dali", image_size=24, batch_size=16,
                     num_workers=2, on_device=True)
    loader = build_loader(cfg, 0, 0, 1, torch.device("cuda", 0))
    assert loader.device_images.is_cuda
    host = build_loader(DataConfig(**{**cfg.__dict__, "on_device": False}), 0, 0, 1, torch.device("cuda", 0))
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        host.set_epoch(epoch)
        got = [(pair[0], y) for (pair,), y in loader]
        assert [y.tolist() for _, y in got] == [y.tolist() for _, y in host]
        assert all(v1.is_cuda and v1.shape == (16, 3, 24, 24) for v1, _ in got)
    assert loader.pipelines_built == 1
