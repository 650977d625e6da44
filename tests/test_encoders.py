"""The encoders people pretrain at scale (SimCLR's ResNet-50 widths, SimCLRv2's deeper ResNets and
3-layer head), and evaluation from inside the projection head (SimCLRv2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.runs import tiny_overrides
from trainer.config import ARCHS, ModelConfig, load_config
from trainer.model.optim import param_groups
from trainer.model.simclr import SimCLRModel, encoder_state_dict
from trainer.runtime.distributed import DistInfo

CPU_ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NEW = ["resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"]


def test_every_arch_says_its_feature_width():
    from trainer.model.encoders import build_encoder, feature_dim

    widths = {}
    for arch in ARCHS:
        with torch.device("meta"):
            widths[arch] = feature_dim(build_encoder(arch))
    assert widths == {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
                      "wide_resnet50_2": 2048, "wide_resnet101_2": 2048} and set(NEW) <= set(ARCHS)


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW)
def test_each_new_encoder_trains_a_step_with_the_cifar_stem_and_exports(photo_data, tmp_path, arch):
    from trainer.run.parts import build_parts
    from trainer.run.step import train_step

    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{
        "model.arch": arch, "model.cifar_stem": "true", "model.proj_hidden_dim": 64, "data.batch_size": 4,
        "data.image_size": 16,
        "tracking.enabled": "false"}))
    parts = build_parts(cfg, CPU_ALONE)
    assert isinstance(parts.model.encoder.conv1, nn.Conv2d) and parts.model.encoder.conv1.stride == (1, 1)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    outcome = train_step(parts, [torch.randn(2, 4, 3, 16, 16)], lr=0.1)
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
    assert three([torch.randn(2, 3, 32, 32)]).projections.shape == (2, 16)


def test_eval_from_inside_the_projection_head(photo_data, tmp_path):
    """--head-layers N: features after the head's first N layers of a trained checkpoint; an exported
    encoder has no head, and N beyond the head is refused."""
    from trainer.evaluation.encoder_loading import load_encoder, random_init_like
    from trainer.run.loop import train
    from trainer.state import checkpoint as ckpt
    from trainer.state.checkpoint import CheckpointError

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


# ------------------------------------------------------------------------------------------ timm encoders
TIMM = ["resnet10t", "convnext_atto", "vit_tiny_patch16_224"]  # BatchNorm CNN, LayerNorm CNN, ViT


@pytest.mark.parametrize("name", TIMM)
def test_a_timm_encoder_trains_multi_crop_and_exports_what_timm_loads(photo_data, tmp_path, name):
    import timm

    from trainer.run.parts import build_parts
    from trainer.run.step import train_step

    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{
        "model.arch": f"timm/{name}", "model.cifar_stem": "false", "data.batch_size": 4, "data.image_size": 64,
        "tracking.enabled": "false"}))
    parts = build_parts(cfg, CPU_ALONE)
    assert parts.model.feature_dim == timm.create_model(name, num_classes=0).num_features
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    outcome = train_step(parts, [torch.randn(2, 4, 3, 64, 64), torch.randn(2, 4, 3, 32, 32)], lr=0.1)  # 2x64 + 2x32
    assert torch.isfinite(outcome.loss) and outcome.skipped.item() == 0
    assert any(not torch.equal(before[k], v) for k, v in parts.model.state_dict().items())
    # LARS: every norm layer's parameters (BatchNorm, LayerNorm) and every bias adapt no rate and decay no weight
    excluded = {id(p) for p in param_groups(parts.model, 1e-6, True)[1]["params"]}
    norms = [m for m in parts.model.encoder.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))]
    assert norms and all(id(p) in excluded for m in norms for p in m.parameters())
    assert all(id(p) in excluded for n, p in parts.model.named_parameters() if n.endswith(".bias"))
    plain = timm.create_model(name, num_classes=0)
    plain.load_state_dict(encoder_state_dict(parts.model))  # strict: the very keys timm's model has


def test_timm_names_and_stems_are_checked_at_load(tmp_path):
    from trainer.config import ConfigError

    run = f"train.run_dir={tmp_path}/run"
    with pytest.raises(ConfigError, match=r"model.arch='timm/convnxt_tiny': timm .* has no model 'convnxt_tiny'"):
        load_config(None, ["model.arch=timm/convnxt_tiny", run])
    with pytest.raises(ConfigError, match=r"model.cifar_stem=true .* timm/resnet10t is a timm model"):
        load_config(None, ["model.arch=timm/resnet10t", "model.cifar_stem=true", run])
    with pytest.raises(ConfigError, match=r"model.arch='resnet51' is not an encoder we build.*timm/<name>"):
        load_config(None, ["model.arch=resnet51", run])


def test_sync_batchnorm_keeps_timms_batchnorm_with_activation():
    """timm's BatchNormAct2d (RegNet, EfficientNet) normalises, then drops and activates: converted to
    our SyncBatchNorm it still does all three, and the exported encoder is timm's own module again."""
    import timm

    from trainer.model.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

    torch.manual_seed(0)
    plain = timm.create_model("regnetx_002", num_classes=0).train()
    x = torch.randn(4, 3, 32, 32)
    synced = convert_sync_batchnorm(timm.create_model("regnetx_002", num_classes=0).train())
    synced.load_state_dict(plain.state_dict())
    assert any(isinstance(m, SyncBatchNorm) for m in synced.modules())
    assert torch.allclose(synced(x), plain(x), atol=1e-5)  # the activations are still applied
    back = revert_sync_batchnorm(synced)
    assert {type(m).__name__ for m in back.modules()} == {type(m).__name__ for m in plain.modules()}
    assert torch.allclose(back.eval()(x), plain.eval()(x), atol=1e-5)


@pytest.mark.parametrize(("overrides", "said"), [
    # round 7, F26: a fixed input size, refused at load instead of a traceback at the first step
    (["model.arch=timm/mixer_s16_224", "data.image_size=32"],
     "data.image_size is 32 px at epoch 0, which timm/mixer_s16_224 cannot take: it takes only 224 px"),
    # F27: not a multiple of the patch, also where a schedule reaches such a size at a later epoch
    (["model.arch=timm/vit_tiny_patch16_224", "data.image_size=24"],
     "data.image_size is 24 px at epoch 0, which timm/vit_tiny_patch16_224 cannot take: it takes sizes that are "
     "multiples of 16 px (its patch)"),
    (["model.arch=timm/vit_tiny_patch16_224", "train.epochs=3",
      "data.views=[{count: 2, size: {start: 16, end: 32, from_epoch: 0, to_epoch: 2, step: 8}}]"],
     "data.views[0] is 24 px at epoch 1, which timm/vit_tiny_patch16_224"),
])
def test_every_size_the_run_will_use_is_checked_against_the_encoder_at_load(overrides, said):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config(None, ["model.cifar_stem=false", *overrides])
    assert said in str(caught.value)


def test_sizes_the_encoder_takes_pass_the_check():
    from trainer.config import load_config

    load_config(None, ["model.arch=timm/vit_tiny_patch16_224", "model.cifar_stem=false", "train.epochs=3",
                       "data.views=[{count: 2, size: {start: 16, end: 32, from_epoch: 0, to_epoch: 2, step: 16}}]"])
    load_config(None, ["model.arch=timm/resnet10t", "model.cifar_stem=false", "data.image_size=24"])


def test_bench_views_refuses_a_size_the_encoder_cannot_take():
    from tests.helpers.runs import assert_one_line_error, simclr

    assert_one_line_error(simclr("bench", "views", "--arch", "timm/mixer_s16_224", "--views", "2x32"),
                          "--views 2x32 is 32 px, which timm/mixer_s16_224 cannot take", "only 224 px")


def test_eval_and_embed_refuse_an_encoder_that_cannot_take_the_size_they_read_at(photo_data, tmp_path):
    """Round 7, F26/F27 for eval and embed: a ViT trained on views of 32 px in a run whose
    data.image_size is 24 (never a view size there) read its evaluation images at 24 px: a traceback."""
    import yaml

    from tests.helpers.runs import assert_one_line_error, simclr
    from trainer.config import config_to_dict
    from trainer.model.encoders import build_encoder

    arch = "timm/vit_tiny_patch16_224"
    cfg = load_config(None, [f"model.arch={arch}", "model.cifar_stem=false", "data.image_size=24",
                             "data.views=[{count: 2, size: 32}]"])  # a run that trained at 32 px only
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    torch.save(build_encoder(arch, False).state_dict(), tmp_path / "encoder.pt")
    said = ("data.image_size (the size evaluation reads images at) is 24 px, which timm/vit_tiny_patch16_224 cannot "
            "take: it takes sizes that are multiples of 16 px")
    assert_one_line_error(simclr("embed", "--checkpoint", str(tmp_path / "encoder.pt"), "--data",
                                 str(photo_data / "val"), "--out", str(tmp_path / "emb")), said)
    assert_one_line_error(simclr("eval", "--checkpoint", str(tmp_path / "encoder.pt"), "--train-data",
                                 str(photo_data / "train"), "--val-data", str(photo_data / "val")), said)
    assert not (tmp_path / "emb").exists()
