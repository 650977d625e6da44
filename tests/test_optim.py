import math

import pytest
import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.model.optim import LARS, build_optimizer, param_groups
from trainer.model.schedule import WarmupCosine, build_schedule, scaled_lr


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def run_steps(net, opt, steps=5, lr_schedule=None):
    gen = torch.Generator().manual_seed(1)
    for s in range(steps):
        if lr_schedule:
            for g in opt.param_groups:
                g["lr"] = lr_schedule(s)
        x = torch.randn(8, 3, 8, 8, generator=gen)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


class ReferenceLARS:
    """Straightforward per-parameter LARS, the formula written once per tensor."""

    def __init__(self, groups, lr, momentum, eta, clip):
        self.groups, self.lr, self.m, self.eta, self.clip = groups, lr, momentum, eta, clip
        self.bufs = {}
        self.param_groups = [{"lr": lr}]

    def zero_grad(self):
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self):
        lr = self.param_groups[0]["lr"]
        for g in self.groups:
            wd = g["weight_decay"]
            for p in g["params"]:
                d = p.grad.clone()
                if g["lars_adapt"]:
                    w_norm, g_norm = p.norm().item(), d.norm().item()
                    trust = self.eta * w_norm / (g_norm + wd * w_norm + 1e-8) if w_norm > 0 and g_norm > 0 else 1.0
                    if self.clip:
                        trust = min(trust / lr, 1.0)
                    d = (d + wd * p) * trust
                buf = self.bufs.get(p)
                buf = d.clone() if buf is None else buf * self.m + d
                self.bufs[p] = buf
                p -= lr * buf


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
@pytest.mark.parametrize("clip", [False, True])
def test_lars_matches_per_parameter_reference(clip, foreach):
    a, b = small_net(), small_net()
    ours = LARS(param_groups(a, 1e-4, True), lr=0.5, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.001,
                trust_clip=clip, foreach=foreach)
    ref = ReferenceLARS(param_groups(b, 1e-4, True), lr=0.5, momentum=0.9, eta=0.001, clip=clip)
    sched = lambda s: 0.5 * (s + 1) / 5  # noqa: E731
    pa, pb = run_steps(a, ours, lr_schedule=sched), run_steps(b, ref, lr_schedule=sched)
    moved = max((x - y).abs().max().item() for x, y in zip(pa, [p.detach() for p in small_net().parameters()]))
    assert moved > 1e-5
    for x, y in zip(pa, pb):
        assert torch.allclose(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("foreach", [True, False, None], ids=["foreach", "per_tensor", "by_device"])
def test_lars_matches_timm_with_timm_param_groups(foreach):
    timm_optim = pytest.importorskip("timm.optim")
    from timm.optim._param_groups import param_groups_weight_decay

    a, b = small_net(), small_net()
    ours = build_optimizer(a, OptimConfig(name="lars", weight_decay=1e-4, momentum=0.9), lr=0.3)
    for group in ours.param_groups:
        group["foreach"] = foreach
    theirs = timm_optim.Lars(param_groups_weight_decay(b, 1e-4), lr=0.3, momentum=0.9, trust_coeff=0.001)
    for x, y in zip(run_steps(a, ours, steps=6), run_steps(b, theirs, steps=6)):
        assert torch.allclose(x, y, atol=1e-6, rtol=0)


def test_bias_and_norm_excluded_from_decay_and_adaptation():
    net = small_net()
    groups = param_groups(net, 0.1, exclude_bias_and_norm=True)
    assert {p.ndim for p in groups[1]["params"]} == {1}
    assert groups[1]["weight_decay"] == 0 and groups[1]["lars_adapt"] is False
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert len(param_groups(net, 0.1, exclude_bias_and_norm=False)) == 1


def count_foreach_norm_calls(opt, net, monkeypatch) -> list[int]:
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    calls = []
    orig = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or orig(ts, *a, **k))
    opt.step()
    return calls


def test_lars_foreach_step_has_no_per_parameter_python_math(monkeypatch):
    """The foreach path goes through multi-tensor kernels: the trust ratio for N tensors is one stack."""
    net = small_net()
    opt = LARS(param_groups(net, 1e-4, True), lr=0.1, weight_decay=1e-4, foreach=True)
    assert count_foreach_norm_calls(opt, net, monkeypatch) == [2, 2]  # params and grads of the adapted group


def test_lars_chooses_its_implementation_by_device(monkeypatch):
    """CPU tensors take the per-tensor loop (unfused CPU foreach kernels are slower); CUDA ones foreach."""
    from trainer.model.optim import default_foreach

    net = small_net()
    assert not default_foreach(list(net.parameters()))
    opt = LARS(param_groups(net, 1e-4, True), lr=0.1, weight_decay=1e-4)
    assert count_foreach_norm_calls(opt, net, monkeypatch) == []
    if torch.cuda.is_available():
        assert default_foreach(list(small_net().cuda().parameters()))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_other_optimizers_build_and_step(name):
    net = small_net()
    opt = build_optimizer(net, OptimConfig(name=name, weight_decay=1e-4), lr=0.01)
    before = [p.clone() for p in net.parameters()]
    run_steps(net, opt, steps=1)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_lr_scaling_rules():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.3, 4096, "none") == 0.3


def test_warmup_then_cosine_key_points():
    s = WarmupCosine(peak=1.0, total_steps=110, warmup_steps=10, final_fraction=0.0)
    assert s(0) == pytest.approx(0.1)
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(109) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(s(i) >= s(i + 1) for i in range(10, 109))


def test_build_schedule_uses_global_batch_and_epochs():
    cfg = OptimConfig(lr=0.3, lr_scaling="linear", warmup_epochs=2, final_lr_fraction=0.1)
    s = build_schedule(cfg, global_batch=512, steps_per_epoch=10, epochs=5)
    assert s.total == 50 and s.warmup == 20
    assert s(19) == pytest.approx(0.6)
    assert s(10_000) == pytest.approx(0.06)


def test_the_private_torch_kernels_we_call_take_what_we_pass():
    """trainer/runtime/torch_internals.py holds every private torch operator we call; each is checked here
    against the public class that runs it, on the installed torch (an upgrade that changes one fails
    this test, not a user's run)."""
    from trainer.runtime import torch_internals as ti

    torch.manual_seed(0)
    params, grads = [torch.randn(5), torch.randn(3, 2)], [torch.randn(5), torch.randn(3, 2)]
    ours, bufs = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    reference = [p.clone().requires_grad_() for p in params]
    sgd = torch.optim.SGD(reference, lr=0.1, momentum=0.9)
    for _ in range(2):
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        sgd.step()
        ti.fused_sgd_(ours, grads, bufs, lr=0.1, momentum=0.9, found_inf=torch.zeros(()))
    assert all(torch.allclose(a, b.detach(), atol=1e-6) for a, b in zip(ours, reference))
    before = [p.clone() for p in ours]
    ti.fused_sgd_(ours, grads, bufs, lr=0.1, momentum=0.9, found_inf=torch.ones(()))  # an overflow: skipped
    assert all(torch.equal(a, b) for a, b in zip(ours, before))

    found_inf, scaled = torch.zeros(()), [torch.tensor([2.0, 4.0]), torch.tensor([float("inf")])]
    ti.unscale_and_check_(scaled, found_inf, torch.tensor(0.5))
    assert scaled[0].tolist() == [1.0, 2.0] and found_inf.item() == 1.0
    scale, tracker = torch.tensor(1024.0), torch.tensor(0, dtype=torch.int32)
    ti.update_scale_(scale, tracker, found_inf, 2.0, 0.5, 2000)
    assert scale.item() == 512.0  # backed off after the overflow, as GradScaler.update does
    ti.update_scale_(scale, tracker, torch.zeros(()), 2.0, 0.5, 1)
    assert scale.item() == 1024.0  # grown after growth_interval clean steps
