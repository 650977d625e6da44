"""The encoders people pretrain at scale (SimCLR's ResNet-50 widths, SimCLRv2's deeper ResNets and
3-layer head), and evaluation from inside the projection head (SimCLRv2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.runs import tiny_overrides
from trainer.config import ARCHS, ModelConfig, load_config
from trainer.distributed import DistInfo
from trainer.model import FEATURE_DIMS, SimCLRModel, encoder_state_dict
from trainer.optim import param_groups

CPU_ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NEW = ["resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"]


def test_every_arch_has_a_feature_width():
    assert set(ARCHS) == set(FEATURE_DIMS) and set(NEW) <= set(ARCHS)


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW)
def test_each_new_encoder_trains_a_step_with_the_cifar_stem_and_exports(photo_data, tmp_path, arch):
    from trainer.parts import build_parts
    from trainer.step import train_step

    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{
        "model.arch": arch, "model.proj_hidden_dim": 64, "data.batch_size": 4, "data.image_size": 16,
        "tracking.enabled": "false"}))
    parts = build_parts(cfg, CPU_ALONE)
    assert isinstance(parts.model.encoder.conv1, nn.Conv2d) and parts.model.encoder.conv1.stride == (1, 1)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    views = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    outcome = train_step(parts, *views, lr=0.1)
    assert torch.isfinite(outcome.loss) and outcome.skipped.item() == 0
    after = parts.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step changed the weights
    groups = param_groups(parts.model, 1e-6, True)  # LARS exclusions: BN and biases in their own group
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and all(p.ndim > 1 for p in groups[0]["params"])
    import torchvision

    plain = getattr(torchvision.models, arch)(weights=None)
    plain.conv1, plain.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()  # the CIFAR stem (README)
    missing, unexpected = plain.load_state_dict(encoder_state_dict(parts.model), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_the_projection_head_has_the_configured_layers():
    two = SimCLRModel(ModelConfig(arch="resnet18", proj_hidden_dim=32, proj_out_dim=16))
    three = SimCLRModel(ModelConfig(arch="resnet18", proj_hidden_dim=32, proj_out_dim=16, proj_layers=3))
    linears = [m for m in three.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 32), (32, 16)]
    assert [type(m) for m in two.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # v1 keys unchanged
    assert three(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_eval_from_inside_the_projection_head(photo_data, tmp_path):
    """--head-layers N: features after the head's first N layers of a trained checkpoint; an exported
    encoder has no head, and N beyond the head is refused."""
    from trainer import checkpoint as ckpt
    from trainer.checkpoint import CheckpointError
    from trainer.evaluate import load_encoder, random_init_like
    from trainer.loop import train

    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{
        "model.proj_layers": 3, "train.epochs": 1, "tracking.enabled": "false"}))
    result = train(cfg)
    step_file = ckpt.latest_checkpoint(result.run_dir)
    state = ckpt.load_checkpoint(step_file)
    features, run_cfg = load_encoder(step_file, head_layers=1)
    features.eval()
    x = torch.randn(3, 3, 16, 16)
    out = features(x)
    assert out.shape == (3, 32)  # the head's hidden width (model.proj_hidden_dim in tiny_overrides)
    model = SimCLRModel(run_cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    expected = nn.Sequential(*list(model.projector)[:3])(model.encoder(x))
    assert torch.allclose(out, expected, atol=1e-6)
    assert random_init_like(run_cfg, 1)(x).shape == (3, 32)
    with pytest.raises(CheckpointError, match="only a training checkpoint holds"):
        load_encoder(result.encoder_path, head_layers=1)
    with pytest.raises(CheckpointError, match="has 3 layers"):
        load_encoder(step_file, head_layers=4)
