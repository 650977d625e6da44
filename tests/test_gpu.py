"""Checks that need a CUDA device; skipped elsewhere (CI has no GPU). Run on a lent GPU machine:
SyncBatchNorm numerics, and a bf16 + channels_last training run on the GPU."""

import json

import pytest
import torch

from tests.conftest import run_torchrun
from trainer.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_syncbn_two_ranks_equal_batchnorm_on_the_whole_batch(tmp_path):
    proc = run_torchrun("syncbn_numerics.py", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world"] == 2 and r["xgrad_scale"] > 1e-3
    for key in ("out_diff", "xgrad_diff", "wgrad_diff", "running_mean_diff", "running_var_diff"):
        assert r[key] < 1e-4, (key, r)


def test_cuda_training_bf16_channels_last(tiny_config):
    cfg = tiny_config(**{"train.device": "cuda", "precision.dtype": "bf16", "train.stop_after_steps": 4,
                         "tracking.enabled": "false", "data.backend": "torchvision"})
    result = train(cfg)
    assert result.step == 4 and torch.isfinite(torch.tensor(result.loss))
