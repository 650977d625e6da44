"""The online linear probe: trained beside pretraining on detached features, logged each epoch
(training batches, and the validation set split over ranks), resumed exactly from checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.runs import final_state, run_torchrun, tiny_overrides
from trainer.config import load_config
from trainer.run.loop import train
from trainer.runtime.distributed import DistInfo

CPU_ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_probe_resumes_exactly(photo_data, tmp_path):
    common = {"train.epochs": 2, "tracking.enabled": "false", "data.val_root": str(photo_data / "val")}
    train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "a", **common)))
    train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "b", **common,
                                           **{"train.stop_after_steps": 13})))
    train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "b", **common)))
    a, b = final_state(tmp_path / "a")["online_probe"], final_state(tmp_path / "b")["online_probe"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    rows = [r for r in metrics(tmp_path / "a") if "probe/train_top1" in r]
    assert [r["step"] for r in rows] == [10, 20]  # once per epoch
    assert all(0 <= r["probe/train_top1"] <= 1 and 0 <= r["probe/val_top1"] <= 1 for r in rows)
    resumed_rows = [r for r in metrics(tmp_path / "b") if "probe/train_top1" in r]
    assert resumed_rows[-1]["probe/val_top1"] == rows[-1]["probe/val_top1"]


def test_no_gradient_reaches_the_encoder_and_the_probe_learns(photo_data, tmp_path):
    from tests.helpers.grad_cache_batch import global_views
    from trainer.run.parts import build_parts
    from trainer.run.step import train_step

    grads = {}
    for probe in ("true", "false"):
        cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / probe, **{
            "train.online_probe": probe, "tracking.enabled": "false", "data.batch_size": 8}))
        parts = build_parts(cfg, CPU_ALONE)
        assert (parts.online_probe is not None) == (probe == "true")
        train_step(parts, global_views(8, cfg.data.image_size), lr=0.0, labels=torch.arange(8) % 10)
        grads[probe] = {k: p.grad.clone() for k, p in parts.model.named_parameters()}
        if parts.online_probe is not None:
            assert parts.online_probe.classifier.weight.grad.abs().sum() > 0
            assert parts.online_probe.seen.item() == 8
    for key in grads["true"]:
        assert torch.equal(grads["true"][key], grads["false"][key]), key


@pytest.mark.parametrize("micro_batch", [0, 4])
def test_the_probe_is_handed_the_first_views_features(photo_data, tmp_path, micro_batch):
    """The step hands the probe the encoder's features of each image's first view (plain and
    gradient-cached steps alike); the model keeps nothing for it."""
    from tests.helpers.grad_cache_batch import global_views
    from trainer.run.parts import build_parts
    from trainer.run.step import train_step

    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{
        "tracking.enabled": "false", "data.batch_size": 8, "train.micro_batch": micro_batch}))
    parts = build_parts(cfg, CPU_ALONE)
    parts.model.eval()  # BatchNorm on running statistics: the features of a view do not depend on its batch
    handed = []
    parts.online_probe.update = lambda features, labels, skip: handed.append(features)
    groups = global_views(8, cfg.data.image_size, small_views=2)
    with torch.no_grad():
        expected = parts.model.encoder(groups[0][0])
    train_step(parts, groups, lr=0.0, labels=torch.arange(8) % 10)
    assert handed[0].shape == expected.shape and torch.allclose(handed[0], expected, atol=1e-5)
    assert not handed[0].requires_grad


def test_unlabeled_data_has_no_probe(tmp_path):
    import numpy as np

    from trainer.run.parts import build_parts

    x = np.random.default_rng(0).integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", x=x, y=np.full(40, -1))
    cfg = load_config(None, tiny_overrides(tmp_path / "u.npz", tmp_path / "run", **{"tracking.enabled": "false"}))
    assert build_parts(cfg, CPU_ALONE).online_probe is None


def test_two_ranks_train_one_probe_and_split_the_validation(photo_data, tmp_path):
    out = tmp_path / "probe.json"
    proc = run_torchrun("online_probe_ranks.py", str(out), *tiny_overrides(
        photo_data / "train", tmp_path / "run", **{"train.epochs": 1, "tracking.enabled": "false",
                                                   "data.val_root": str(photo_data / "val")}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["weights_equal_on_both_ranks"] and r["val_top1_equal_on_both_ranks"]
    assert r["val_top1"] == r["single_process_val_top1"]  # the split changes nothing
    assert r["knn_equal_on_both_ranks"] and abs(r["knn_top1"] - r["single_process_knn_top1"]) <= 1e-6
