"""Gradient caching (``train.micro_batch``) is the exact large-batch gradient: equal to the single
pass wherever the network treats samples independently, in one process and across 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.grad_cache_batch import global_views
from tests.helpers.runs import run_torchrun, tiny_overrides
from trainer.config import ConfigError, load_config
from trainer.run.loop import train
from trainer.run.parts import build_parts
from trainer.run.step import train_step
from trainer.runtime.distributed import DistInfo

CPU_ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def one_step(photo_data, tmp_path, micro_batch: int, bn_train: bool, batch: int = 16, small_views: int = 0, **extra):
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / f"run{micro_batch}", **{
        "data.batch_size": batch, "train.micro_batch": micro_batch, "tracking.enabled": "false", **extra}))
    parts = build_parts(cfg, CPU_ALONE)
    parts.model.train(bn_train)
    outcome = train_step(parts, global_views(batch, cfg.data.image_size, small_views), lr=0.0)
    grads = {k: p.grad.clone() for k, p in parts.model.named_parameters()}
    return outcome, grads, {k: b.clone() for k, b in parts.model.named_buffers()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("small_views", [0, 4])  # two views; multi-crop 2 x 16 px + 4 x 8 px
def test_cached_gradients_equal_the_single_pass_when_samples_are_independent(photo_data, tmp_path, small_views):
    plain, plain_grads, _ = one_step(photo_data, tmp_path, 0, bn_train=False, small_views=small_views)
    cached, cached_grads, _ = one_step(photo_data, tmp_path, 4, bn_train=False, small_views=small_views)  # B/4
    assert max(g.abs().max().item() for g in plain_grads.values()) > 1e-4  # not trivially zero
    assert max_diff(plain_grads, cached_grads) <= 1e-5
    assert cached.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)
    assert cached.accuracy.item() == plain.accuracy.item()


def test_the_comparison_can_fail_batchnorm_statistics_are_per_micro_batch(photo_data, tmp_path):
    """With BatchNorm in training mode the micro-batches see their own statistics: not equal."""
    _, plain_grads, _ = one_step(photo_data, tmp_path, 0, bn_train=True)
    _, cached_grads, _ = one_step(photo_data, tmp_path, 4, bn_train=True)
    assert max_diff(plain_grads, cached_grads) > 1e-4


def test_running_statistics_move_once_per_step(photo_data, tmp_path):
    _, _, plain = one_step(photo_data, tmp_path, 0, bn_train=True)
    _, _, one_chunk = one_step(photo_data, tmp_path, 16, bn_train=True)  # one micro-batch: the plain step
    assert all(torch.allclose(plain[k].double(), one_chunk[k].double(), atol=1e-6) for k in plain)
    _, _, four = one_step(photo_data, tmp_path, 4, bn_train=True)
    counts = {v.item() for k, v in four.items() if k.endswith("num_batches_tracked")}
    assert counts == {4}  # the second pass's four micro-batches, not the first pass's as well


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cached_step_under_mixed_precision_is_close_to_the_single_pass(photo_data, tmp_path, dtype):
    # timm's test ResNet, a batch of 8 in two micro-batches: low-precision convolutions take slow reference
    # kernels on the CPU, whose backward costs with the weights
    low = {"precision.dtype": dtype, "model.arch": "timm/test_resnet", "model.cifar_stem": "false"}
    _, plain_grads, _ = one_step(photo_data, tmp_path, 0, bn_train=False, batch=8, **low)
    cached, cached_grads, _ = one_step(photo_data, tmp_path, 4, bn_train=False, batch=8, **low)
    assert not cached.skipped
    scale = max(g.abs().max().item() for g in plain_grads.values())
    assert max_diff(plain_grads, cached_grads) <= 2e-2 * scale  # both autocast to low precision


def test_two_ranks_with_micro_batches_equal_one_process_on_the_global_batch(photo_data, tmp_path):
    base = tiny_overrides(photo_data / "train", tmp_path / "run", **{"data.batch_size": 16,
                                                                     "tracking.enabled": "false"})
    proc = run_torchrun("grad_cache_parity.py", str(tmp_path / "two.pt"), *base, "train.micro_batch=2")  # B/4/rank
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_torchrun("grad_cache_parity.py", str(tmp_path / "one.pt"), *base, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert max(g.abs().max().item() for g in one["grads"].values()) > 1e-4
    assert max_diff(one["grads"], two["grads"]) <= 1e-5
    assert two["loss"].item() == pytest.approx(one["loss"].item(), abs=1e-6)


def test_micro_batch_must_divide_the_rank_share(tiny_config):
    with pytest.raises(ConfigError, match=r"train.micro_batch=3 does not divide.*\[1, 2, 4, 8\]"):
        build_parts(tiny_config(**{"train.micro_batch": 3}), CPU_ALONE)


def test_training_with_micro_batches_checkpoints_and_resumes_bitwise(tiny_config, tmp_path):
    from tests.helpers.runs import assert_bitwise_equal, final_state

    # two micro-batches a step and checkpoints at the stop and the end only: the smallest run that
    # still resumes a cached step mid-epoch
    over = {"train.micro_batch": 4, "tracking.enabled": "false", "checkpoint.every_steps": 100}
    straight = train(tiny_config(**over, **{"train.run_dir": str(tmp_path / "a")}))
    train(tiny_config(**over, **{"train.run_dir": str(tmp_path / "b"), "train.stop_after_steps": 7}))
    resumed = train(tiny_config(**over, **{"train.run_dir": str(tmp_path / "b")}))
    assert straight.step == resumed.step == 20 and torch.isfinite(torch.tensor(straight.loss))
    assert_bitwise_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_memory_benchmark_writes_a_row_per_batch_and_mode(tmp_path):
    import json
    import os
    import subprocess

    from tests.helpers.runs import PY, REPO

    out = tmp_path / "gc.json"
    proc = subprocess.run([PY, "-m", "benchmarks.grad_cache", "--batches", "8", "--micro", "4", "--image-size",
                           "16", "--out", str(out)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["batch"], r["micro"]) for r in result["rows"]] == [(8, 0), (8, 4)]
    assert all(r["fits"] and r["peak_memory_mb"] > 0 and r["images_per_s"] > 0 for r in result["rows"])
    assert result["device"] and result["git_commit"] and "cached peak RSS" in proc.stdout
