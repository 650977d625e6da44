"""The hot step asks the host for nothing: zero host syncs per steady-state step between two log
windows (see tests/helpers/count_syncs.py for what counts), in one process and on 2 gloo ranks
(DDP, our SyncBatchNorm, gathered NT-Xent, the device-side skip verdict)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.count_syncs import count_window_syncs
from tests.helpers.runs import run_torchrun, tiny_overrides
from trainer.config import load_config

STEADY = {"train.log_every": 4, "train.stop_check_every": 4, "checkpoint.every_steps": 100,
          "train.stop_after_steps": 9, "tracking.enabled": "false"}


# fp16 and bf16 convolutions on the CPU take PyTorch's slow reference kernels, whose backward costs with the
# weights (3 s a ResNet-18 step here): timm's test ResNet (0.4M parameters), half the batch
LOW = {"model.arch": "timm/test_resnet", "model.cifar_stem": "false", "data.batch_size": 4}


@pytest.mark.parametrize("extra", [{"precision.dtype": "fp32"}, {"precision.dtype": "bf16", **LOW},
                                   {"precision.dtype": "fp16", **LOW}, {"train.micro_batch": 4},
                                   {"optim.name": "sgd"}, {"optim.name": "adamw"},
                                   # multi-crop with a resolution schedule and per-group blur, cached or not
                                   {"data.views": "[{count: 2, size: [[0, 16], [1, 24]]}, {count: 3, size: 8, "
                                                  "blur_prob: 0.0, solarize_prob: 0.2}]", "train.micro_batch": 4},
                                   {"data.views": "[{count: 2}, {count: 4, size: 8}]", "model.arch": "timm/resnet10t",
                                    "model.cifar_stem": "false"}],
                         ids=["fp32", "bf16", "fp16", "grad_cache", "sgd", "adamw", "multi_crop_cached",
                              "multi_crop_timm"])
def test_no_host_sync_in_a_steady_state_step(photo_data, tmp_path, extra):
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{**STEADY, **extra}))
    assert count_window_syncs(cfg) == {}


def test_the_counter_sees_a_sync_added_to_the_step(photo_data, tmp_path, monkeypatch):
    """The test above can fail: an ``.item()`` in the step is counted once per counted step."""
    import trainer.run.step as step_module

    real = step_module.all_reduce_
    monkeypatch.setattr(step_module, "all_reduce_", lambda flag, op="sum": (real(flag, op), flag.item())[0])
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **STEADY))
    assert count_window_syncs(cfg) == {"item": 3}


@pytest.mark.slow
def test_no_host_sync_in_a_steady_state_step_on_two_ranks(photo_data, tmp_path):
    out = tmp_path / "syncs"
    proc = run_torchrun("count_syncs.py", str(out), *tiny_overrides(photo_data / "train", tmp_path / "run", **STEADY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads(out.with_name(f"syncs.rank{rank}").read_text()) == {}, rank
