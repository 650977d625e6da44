import json
import math

import pytest
import torch

from benchmarks.loss import nt_xent_full_matrix
from tests.helpers.runs import run_torchrun
from trainer.loss import nt_xent


def paper_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """The SimCLR paper's formula, written out literally in float64."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sim = lambda a, b: (z[a] @ z[b]).item() / temperature  # noqa: E731
        denom = sum(math.exp(sim(i, k)) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim(i, j)) / denom)
    return total / n2


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_matches_paper_formula(temperature):
    gen = torch.Generator().manual_seed(int(temperature * 100))
    z1, z2 = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    loss, _ = nt_xent(z1, z2, temperature, gather=False)
    assert loss.item() == pytest.approx(paper_nt_xent(z1, z2, temperature), rel=1e-5, abs=1e-5)
    assert nt_xent_full_matrix(z1, z2, temperature).item() == pytest.approx(loss.item(), rel=1e-5)


def test_accuracy_counts_positive_ranked_first():
    z = torch.eye(4)
    loss, acc = nt_xent(z, z.clone(), 0.1, gather=False)  # each view's twin is identical: perfect
    assert acc.item() == 1.0
    loss_bad, acc_bad = nt_xent(z, z.roll(1, dims=0), 0.1, gather=False)  # twins are other images
    assert acc_bad.item() == 0.0 and loss_bad > loss


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_stay_finite(dtype):
    gen = torch.Generator().manual_seed(0)
    z1 = (torch.randn(64, 32, generator=gen) * 1e3).to(dtype).requires_grad_()
    z2 = (z1.detach() + torch.randn(64, 32, generator=gen).to(dtype)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc = nt_xent(z1, z2, 0.05, gather=False)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_two_rank_gather_equals_single_process(tmp_path):
    out = tmp_path / "parity.json"
    proc = run_torchrun("loss_parity.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    assert res["loss_diff"] <= 1e-6
    assert res["grad_scale"] > 1e-4  # the gradients compared are not trivially zero
    assert res["grad1_diff"] <= 1e-6 and res["grad2_diff"] <= 1e-6
