import json
import math

import pytest
import torch

from benchmarks.loss import full_matrix_loss
from tests.helpers.runs import run_torchrun
from tests.helpers.two_view_loss import two_view_nt_xent
from trainer.config import ConfigError, LossConfig, load_config
from trainer.losses import LOSSES, build_loss, register_loss
from trainer.losses.nt_xent import nt_xent
from trainer.losses.registry import LOSS_PARAMS


def paper_loss(views: torch.Tensor, temperature: float) -> float:
    """SupCon's L_out with an image's views as its class, written out literally in float64 (two
    views: the SimCLR paper's NT-Xent)."""
    n_views, n, _ = views.shape
    z = views.double().flatten(0, 1)
    z = z / z.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(n_views * n):
        sim = lambda a, b: (z[a] @ z[b]).item() / temperature  # noqa: E731
        denom = sum(math.exp(sim(i, k)) for k in range(n_views * n) if k != i)
        positives = [k for k in range(n_views * n) if k != i and k % n == i % n]
        total += -sum(math.log(math.exp(sim(i, p)) / denom) for p in positives) / len(positives)
    return total / (n_views * n)


@pytest.mark.parametrize("views,temperature", [(2, 0.05), (2, 0.5), (3, 0.1), (8, 0.2)])
def test_matches_the_formula(views, temperature):
    z = torch.randn(views, 5, 8, generator=torch.Generator().manual_seed(views))
    loss, _ = nt_xent(z, temperature, gather=False)
    assert loss.item() == pytest.approx(paper_loss(z, temperature), rel=1e-5, abs=1e-5)
    assert full_matrix_loss(z, temperature).item() == pytest.approx(loss.item(), rel=1e-5)


def test_two_views_give_the_two_view_loss_and_gradients():
    z = (torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    loss, acc = nt_xent(z, 0.1, gather=False)
    loss.backward()
    ref = z.detach().clone().requires_grad_()
    ref_loss, ref_acc = two_view_nt_xent(ref[0], ref[1], 0.1, gather=False)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 and acc.item() == ref_acc.item()
    assert ref.grad.abs().max() > 1e-4 and (z.grad - ref.grad).abs().max() <= 1e-6


def test_accuracy_counts_a_positive_ranked_first():
    z = torch.eye(4)
    loss, acc = nt_xent(torch.stack([z, z, z]), 0.1, gather=False)  # every view of an image identical
    assert acc.item() == 1.0
    loss_bad, acc_bad = nt_xent(torch.stack([z, z.roll(1, 0), z.roll(2, 0)]), 0.1, gather=False)
    assert acc_bad.item() == 0.0 and loss_bad > loss


def test_memory_stays_local_rows_by_global_columns():
    """Nothing the backward keeps is larger than this rank's Vn rows x the VN columns (the naive form
    keeps VN x VN)."""
    views, n, dim = 8, 6, 16
    local = torch.randn(views, n, dim, requires_grad=True)
    columns = torch.nn.functional.normalize(torch.randn(views, 4 * n, dim), dim=2)  # a world of 4
    largest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        largest[0] = max(largest[0], t.numel())
        return t

    from trainer.losses.nt_xent import contrastive_loss

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        contrastive_loss(torch.nn.functional.normalize(local, dim=2), columns, n, 0.1)
        assert largest[0] <= (views * n) * (views * 4 * n)
        full_matrix_loss(torch.randn(views, 4 * n, dim, requires_grad=True), 0.1)
    assert largest[0] >= (views * 4 * n) ** 2  # the hook sees the naive form's matrix: it can fail


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_stay_finite(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen) * 1e3
    z = torch.stack([base, base + torch.randn(64, 32, generator=gen)]).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc = nt_xent(z, 0.05, gather=False)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_a_loss_is_chosen_by_name_and_a_new_one_is_a_registration(tmp_path):
    assert build_loss(LossConfig())(torch.randn(2, 4, 8))[0].item() > 0
    with pytest.raises(ConfigError, match=r"loss.name: 'decoupled'.*choose one of nt_xent"):
        load_config(None, ["loss.name=decoupled", f"train.run_dir={tmp_path}/run"])

    @register_loss("mean_cosine")  # a second loss: one builder and its registration
    def build(cfg: LossConfig):
        return lambda views: (-(views[0] * views[1]).sum(1).mean(), torch.zeros(()))

    try:
        cfg = load_config(None, ["loss.name=mean_cosine", f"train.run_dir={tmp_path}/run"])
        assert build_loss(cfg.loss)(torch.ones(2, 3, 4))[0].item() == -4.0
    finally:
        del LOSSES["mean_cosine"]


def test_a_loss_declares_its_own_parameters_in_its_module(tmp_path):
    """A loss with a hyper-parameter of its own is one file (``tests/helpers/weighted_loss.py``):
    the dataclass beside it is read from ``loss.options.*``, checked at load with the full key and a
    did-you-mean, kept as a hyper-parameter of the run, and handed to its builder."""
    import importlib

    import tests.helpers.weighted_loss as weighted_loss
    from foundation.resume_policy import resume_policies
    from trainer.config import Config, config_to_dict

    importlib.reload(weighted_loss)  # (registers again after another test cleaned the table)
    run = f"train.run_dir={tmp_path}/run"
    try:
        cfg = load_config(None, ["loss.name=nt_xent_weighted", "loss.options.weight=2.5", run])
        views = torch.randn(2, 4, 8)
        assert build_loss(cfg.loss)(views)[0].item() == pytest.approx(2.5 * build_loss(LossConfig())(views)[0].item())
        assert config_to_dict(cfg)["loss"]["options"] == {"weight": 2.5}  # into config.yaml, checkpoints, MLflow
        assert load_config(None, ["loss.name=nt_xent_weighted", run]).loss.params().weight == 1.0  # its default
        with pytest.raises(ConfigError, match=r"unknown config key 'loss.options.wieght' \(did you mean 'weight'"):
            load_config(None, ["loss.name=nt_xent_weighted", "loss.options.wieght=2", run])
        with pytest.raises(ConfigError, match=r"loss.options.weight: 'heavy'|loss.options.weight: expected a number"):
            load_config(None, ["loss.name=nt_xent_weighted", "loss.options.weight=heavy", run])
        with pytest.raises(ConfigError, match=r"loss.options.weight: -1.0 is out of range; must be > 0"):
            load_config(None, ["loss.name=nt_xent_weighted", "loss.options.weight=-1.0", run])
        with pytest.raises(ConfigError, match=r"loss.options: nt_xent takes no options of its own \(given: weight\)"):
            load_config(None, ["loss.options.weight=2", run])  # options left for a loss not chosen
        assert resume_policies(Config)["loss.options"] == "hyper"  # a resume may not change them silently
        from pathlib import Path

        from trainer.state.resume import CheckpointError, reconcile

        plain = load_config(None, ["loss.name=nt_xent_weighted", run])  # the run began with the default weight
        state = {"config": config_to_dict(plain), "step": 4}
        assert not reconcile(state, plain, Path("step_4.pt"), {}).hyper
        with pytest.raises(CheckpointError, match=r"loss.options.*checkpoint.allow_changes=true"):
            reconcile(state, cfg, Path("step_4.pt"), {})  # an option given on resume: a change, refused
    finally:
        del LOSSES["nt_xent_weighted"], LOSS_PARAMS["nt_xent_weighted"]


def test_two_rank_gather_equals_single_process(tmp_path):
    out = tmp_path / "parity.json"
    proc = run_torchrun("loss_parity.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    for views in ("views2", "views8"):
        assert res[views]["loss_diff"] <= 1e-6, res
        assert res[views]["grad_scale"] > 1e-4  # the gradients compared are not trivially zero
        assert res[views]["grad_diff"] <= 1e-6, res
