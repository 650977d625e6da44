import pytest
import torch
import torchvision
from torch import nn

from tests.helpers.fake_nccl import fake_nccl
from trainer.config import ModelConfig
from trainer.model.simclr import SimCLRModel, build_model, convert_sync_bn, encoder_state_dict, sync_bn_groups
from trainer.model.sync_batchnorm import SyncBatchNorm
from trainer.runtime.dataclass_yaml import ConfigError


@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_encoder_and_head_shapes(arch, feat):
    model = SimCLRModel(ModelConfig(arch=arch, proj_out_dim=64))
    assert model.feature_dim == feat
    assert model.encoder(torch.randn(2, 3, 64, 64)).shape == (2, feat)
    out = model([torch.randn(2, 3, 64, 64), torch.randn(4, 3, 32, 32)])  # two size groups, one head pass
    assert [f.shape for f in out.features] == [(2, feat), (4, feat)] and out.projections.shape == (6, 64)
    head = [type(m) for m in model.projector]
    assert head == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.projector[0].out_features == feat  # default hidden width = encoder width


def test_cifar_stem_keeps_resolution():
    plain = SimCLRModel(ModelConfig(cifar_stem=False)).encoder
    cifar = SimCLRModel(ModelConfig(cifar_stem=True)).encoder
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity) and isinstance(plain.maxpool, nn.MaxPool2d)


def test_encoder_export_loads_into_plain_torchvision_resnet():
    model = SimCLRModel(ModelConfig(arch="resnet50"))
    sd = encoder_state_dict(model)
    target = torchvision.models.resnet50()
    result = target.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(target.layer4[2].conv3.weight, model.encoder.layer4[2].conv3.weight)


def test_sync_bn_groups():
    assert sync_bn_groups(8, 0) == [list(range(8))]
    assert sync_bn_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sync_bn_groups(4, 8) == [[0, 1, 2, 3]]
    with pytest.raises(ConfigError, match=r"sync_bn_group_size=4 does not divide the 6 ranks.*one of 1, 2, 3, 6"):
        sync_bn_groups(6, 4)


def test_sync_bn_conversion_wiring_on_cpu():
    """Every BatchNorm is replaced by our SyncBatchNorm (which runs on gloo too: its numerics are in
    tests/test_sync_batchnorm.py) and the running statistics are kept."""
    model = SimCLRModel(ModelConfig())
    model.encoder.bn1.running_mean.fill_(0.5)
    converted = convert_sync_bn(model, world_size=1, group_size=0)
    kinds = {type(m) for m in converted.modules()}
    assert SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds
    assert torch.all(converted.encoder.bn1.running_mean == 0.5)
    assert set(encoder_state_dict(converted)) == set(encoder_state_dict(SimCLRModel(ModelConfig())))


def test_build_model_syncs_bn_on_cpu_too_with_world_gt_1():
    model = build_model(ModelConfig(sync_bn=True), torch.device("cpu"), world_size=2)
    assert any(isinstance(m, SyncBatchNorm) for m in model.modules())
    alone = build_model(ModelConfig(sync_bn=True), torch.device("cpu"), world_size=1)
    assert not any(isinstance(m, SyncBatchNorm) for m in alone.modules())


@pytest.mark.parametrize("group_size, groups, mine", [(4, [(0, 1, 2, 3), (4, 5, 6, 7)], ("group", (4, 5, 6, 7))),
                                                      (0, [], None)])
def test_sync_bn_takes_its_group_from_the_helpers(monkeypatch, group_size, groups, mine):
    """On 8 NCCL ranks, rank 5 makes both blocks of 4 in order (making a group is collective) and
    synchronises within its own; with no blocks, the default group (None) and no group made."""
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)
    with fake_nccl(world_size=8, rank=5) as nccl:
        model = build_model(ModelConfig(sync_bn=True, sync_bn_group_size=group_size), torch.device("cuda", 5),
                            world_size=8)
    assert nccl.groups == groups
    layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert layers and all(m.process_group == mine for m in layers)
