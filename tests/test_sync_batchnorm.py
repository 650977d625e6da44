"""Our SyncBatchNorm (``trainer.model.sync_batchnorm``): numerics on 2 real gloo ranks on the CPU, and
the export back to plain BatchNorm."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from tests.helpers.runs import run_torchrun
from tests.helpers.syncbn_compare import one_rank_process_group, syncbn_against_plain
from trainer.model.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm


def test_two_ranks_equal_batchnorm_over_the_whole_batch_on_cpu(tmp_path):
    proc = run_torchrun("syncbn_numerics.py", str(tmp_path / "r.json"), "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world"] == 2 and r["converted"] == "SyncBatchNorm"
    for step in ("step0", "step1"):
        assert r[step]["xgrad_scale"] > 1e-3  # the gradients compared are not trivially zero
        for key in ("out_diff", "xgrad_diff", "fgrad_diff", "param_grad_diff"):
            assert r[step][key] < 1e-5, (step, key, r)
    for key in ("running_mean_diff", "running_var_diff", "running_1d_diff"):
        assert r[key] < 1e-5, (key, r)
    assert max(r["own_group"].values()) < 1e-4, r["own_group"]  # sync_bn_group_size=1: a group of its own


def test_alone_or_in_eval_it_is_plain_batchnorm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]
    assert isinstance(sync, SyncBatchNorm)
    x = torch.randn(6, 4, 3, 3)
    assert torch.allclose(sync(x), plain(x))
    assert torch.allclose(sync.running_mean, plain.running_mean)
    sync.eval(), plain.eval()
    assert torch.allclose(sync(x), plain(x))


def test_revert_gives_a_plain_torchvision_resnet_with_the_same_weights():
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        net.bn1.running_mean.add_(1.5)
    synced = convert_sync_batchnorm(net)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    plain = revert_sync_batchnorm(synced)
    assert any(type(m) is nn.BatchNorm2d for m in plain.modules())
    assert not any(isinstance(m, SyncBatchNorm) for m in plain.modules())
    assert plain.bn1.running_mean[0].item() == 1.5
    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(plain.state_dict())  # the same keys: loads into a stock torchvision ResNet


@pytest.fixture
def one_rank_group():
    with one_rank_process_group("gloo"):
        yield


def test_a_large_mean_loses_nothing(one_rank_group):
    """Mean 1e4, std 1: E[x^2] - mean^2 in fp32 (the former formula) cancels to noise of the size
    of the variance itself; the statistics here are stable (per-rank two-pass, combined in float64)."""
    x = torch.randn(16, 8, 6, 6, generator=torch.Generator().manual_seed(0)) + 1e4
    diffs = syncbn_against_plain(x)
    assert diffs["out"] < 2e-2 and diffs["xgrad"] < 2e-2 and diffs["running_var"] < 1e-2, diffs
    naive_var = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # the former formula, on the same fp32 input
    assert (naive_var - x.double().var((0, 2, 3), unbiased=False)).abs().max() > 0.1  # it would have failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_one_rank_in_a_group_equals_batchnorm_in_values_and_gradients(one_rank_group, dtype, affine):
    x = (torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    diffs = syncbn_against_plain(x, affine)
    bound = 1e-4 if dtype == torch.float32 else 5e-2
    assert all(v < bound for v in diffs.values()), diffs
