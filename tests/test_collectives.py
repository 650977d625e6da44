"""Every collective of the product lives in ``foundation.collectives``, and each helper keeps NCCL's
rules: checked on the CPU against a group whose backend reports "nccl" (``tests/helpers/fake_nccl``),
as rank 1 of 2 whose device is cuda:1 while the current device starts at cuda:0 (the case that
hangs a real node), and as one rank alone (the collective still runs)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from foundation import collectives
from tests.helpers.fake_nccl import FakeCudaTensor, NcclRuleBroken, fake_nccl
from tests.helpers.runs import REPO

PRODUCT = ("foundation", "data_pipeline", "trainer", "benchmarks", "launch")
COLLECTIVE_CALL = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|barrier|monitored_barrier|reduce\w*|"
                             r"gather\w*|scatter\w*|all_to_all\w*|send|recv|isend|irecv|new_group|new_subgroups\w*|"
                             r"split_group)\(")


def test_no_collective_is_called_outside_the_helpers():
    """The own SyncBatchNorm's two all-reduces go through ``all_reduce_`` too; making a group is
    collective, and goes through ``collectives.subgroup``."""
    found = {}
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            name = str(path.relative_to(REPO))
            calls = COLLECTIVE_CALL.findall(path.read_text())
            if calls and name != "foundation/collectives.py":
                found[name] = calls
    assert found == {}, f"collectives outside foundation/collectives.py: {found}"


def test_the_scan_sees_a_collective(tmp_path):
    assert COLLECTIVE_CALL.findall("x = 1\ndist.all_gather_object(out, obj)\n    dist.barrier()\n"
                                   "g = dist.new_group(ranks)\n") == ["all_gather_object", "barrier", "new_group"]


def test_host_flags_travel_on_the_ranks_device_under_nccl():
    """The crash that every NCCL run met before step 1: Python bools stacked on the CPU and
    all-reduced. Here they travel on cuda:1 (this rank's device), as float32, and come back as bools."""
    with fake_nccl(rank=1) as nccl:
        assert collectives.agree_any(False, True) == [False, True]
        assert collectives.agree_any(torch.tensor(1.0)) == [True]  # a CPU tensor flag as well
    assert [c["devices"] for c in nccl.calls] == [["cuda:1"], ["cuda:1"]]
    assert nccl.calls[0]["dtypes"] == [torch.float32]


def test_the_fake_group_refuses_what_nccl_refuses():
    """The checker itself can fail: a CPU tensor, another rank's device, a non-contiguous tensor,
    an object collective with the wrong current device."""
    import torch.distributed as dist

    with fake_nccl(rank=1):
        with pytest.raises(NcclRuleBroken, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(2))
        with pytest.raises(NcclRuleBroken, match="this rank's device is cuda:1"):
            dist.all_reduce(torch.zeros(2, device="cuda:0"))
        with pytest.raises(NcclRuleBroken, match="contiguous"):
            dist.all_reduce(torch.zeros(4, 4, device="cuda:1").t())
        with pytest.raises(NcclRuleBroken, match="current CUDA device is cuda:0"):
            dist.all_gather_object([None, None], "x")
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(3, device="cuda:1") + torch.zeros(3)


def test_all_reduce_of_a_device_tensor_stays_on_it_and_a_host_tensor_comes_back():
    with fake_nccl(rank=1) as nccl:
        on_device = torch.ones(3, device="cuda:1")
        assert collectives.all_reduce_(on_device) is on_device and on_device.device == torch.device("cuda", 1)
        assert on_device.tolist() == [2.0, 2.0, 2.0]  # two ranks' sums
        host = torch.tensor([1.0, 3.0], dtype=torch.float64)
        collectives.all_reduce_(host, "avg")
        assert host.device.type == "cpu" and host.tolist() == [1.0, 3.0]  # gloo has no AVG: summed, divided
        strided = torch.arange(6.0, device="cuda:1").view(2, 3).t()
        collectives.all_reduce_(strided, "max")  # not contiguous: through a contiguous copy, written back
        assert strided.tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
        flags = torch.tensor([True, False])
        collectives.all_reduce_(flags)
        assert flags.dtype == torch.bool and flags.tolist() == [True, False]
    assert all(c["devices"] == ["cuda:1"] for c in nccl.calls), nccl.calls
    assert nccl.calls[1]["dtypes"] == [torch.float64] and nccl.calls[3]["dtypes"] == [torch.int32]


def test_a_subgroups_all_reduce_runs_on_that_group():
    """SyncBatchNorm's blocks: rank 1 of 4 reduces over its block's group, made by every rank in order."""
    with fake_nccl(world_size=4, rank=1) as nccl:
        group = collectives.subgroup([[0, 1], [2, 3]])
        collectives.all_reduce_(torch.ones(2, device="cuda:1"), group=group)
    assert nccl.groups == [(0, 1), (2, 3)] and group == ("group", (0, 1))
    assert nccl.calls[-1]["name"] == "all_reduce" and nccl.calls[-1]["group"] == group


def test_gathers_take_host_rows_through_the_device_and_unequal_lengths_padded():
    with fake_nccl(rank=1) as nccl:
        rows = collectives.gather_rows(torch.tensor([1.0, 2.0], dtype=torch.float64))
        assert rows.device.type == "cpu" and rows.tolist() == [[1.0, 2.0], [1.0, 2.0]]
        shares = collectives.gather_varying(torch.arange(6).view(3, 2))
        assert [s.device.type for s in shares] == ["cpu", "cpu"] and shares[1].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert all(d.startswith("cuda:1") for c in nccl.calls for d in c["devices"]), nccl.calls
    # gather_varying: the lengths, then the padded rows (NCCL gathers equal sizes only)
    assert [c["name"] for c in nccl.calls] == ["all_gather_single"] * 3


def test_gather_with_grad_under_nccl_forward_and_backward():
    with fake_nccl(rank=1) as nccl:
        x = torch.ones(2, 3, device="cuda:1", requires_grad=True)
        out = collectives.gather_with_grad(x)
        assert out.shape == (4, 3) and isinstance(out, FakeCudaTensor)
        # autograd's engine hands the backward plain tensors (it bypasses the fake device): called directly
        # with the gradient where it lives on a GPU, beside the output
        grad = collectives._GatherWithGrad.backward(SimpleNamespace(rank=1, n=2), torch.ones(4, 3, device="cuda:1"))
        assert grad.device == torch.device("cuda", 1) and grad.tolist() == [[2.0] * 3] * 2  # both ranks' losses
    assert [c["name"] for c in nccl.calls] == ["all_gather_single", "all_reduce"]


def test_object_collectives_and_the_barrier_set_the_ranks_device_first():
    with fake_nccl(rank=1, broadcast_from_src=[("rank 0's", 1)]) as nccl:
        assert collectives.gather_objects({"host": "b"}) == [{"host": "b"}, {"host": "b"}]
        assert collectives.broadcast_object("mine") == ("rank 0's", 1)
        collectives.barrier()
    assert nccl.set_devices and set(nccl.set_devices) == {1}
    assert [c["name"] for c in nccl.calls] == ["all_gather_object", "broadcast_object_list", "barrier"]


def test_the_device_bound_at_init_wins_over_local_rank():
    with fake_nccl(rank=1, local_rank=1) as nccl:
        collectives.bind_device(torch.device("cuda", 1))
        assert collectives.collective_device() == torch.device("cuda", 1)
        collectives.gather_objects(1)
    assert nccl.set_devices == [1]


def test_on_rank_zero_raises_rank_zeros_error_on_every_rank():
    class FolderGone(Exception):
        pass

    with fake_nccl(rank=1, broadcast_from_src=[(0, "the run folder was moved")]):
        with pytest.raises(FolderGone, match="the run folder was moved"):
            collectives.on_rank_zero(lambda: None, (FolderGone,))


@pytest.mark.parametrize("helper", ["agree_any", "all_reduce_", "gather_rows", "gather_varying", "gather_with_grad",
                                    "gather_objects", "broadcast_object", "barrier"])
def test_alone_in_a_group_every_helper_still_runs_its_collective(helper):
    """A 1-rank NCCL job on one GPU runs every collective a 64-GPU job runs."""
    calls = {"agree_any": lambda: collectives.agree_any(False),
             "all_reduce_": lambda: collectives.all_reduce_(torch.ones(2)),
             "gather_rows": lambda: collectives.gather_rows(torch.ones(2)),
             "gather_varying": lambda: collectives.gather_varying(torch.ones(2)),
             "gather_with_grad": lambda: collectives.gather_with_grad(torch.ones(2, device="cuda:0")),
             "gather_objects": lambda: collectives.gather_objects("x"),
             "broadcast_object": lambda: collectives.broadcast_object("x"),
             "barrier": collectives.barrier}
    with fake_nccl(world_size=1, rank=0) as nccl:
        calls[helper]()
    assert nccl.calls, f"{helper} skipped its collective at world size 1"


def test_without_a_group_the_helpers_answer_for_one_process():
    assert collectives.agree_any(True, False) == [True, False]
    t = torch.ones(2)
    assert collectives.all_reduce_(t) is t and collectives.gather_rows(t).shape == (1, 2)
    assert collectives.gather_objects(3) == [3] and collectives.broadcast_object(4) == 4
    assert collectives.subgroup([[0], [1]]) is None  # no group to split: the default
    assert collectives.collective_device() == torch.device("cpu")


def test_a_training_runs_collective_sites_keep_the_rules(tmp_path):
    """The sites that used to choose their own device: the metrics window's gather, the hosts of
    the bottleneck watch, the online probe's averages, the stop agreement."""
    from trainer.config import Config
    from trainer.observe.bottlenecks import Bottlenecks
    from trainer.observe.metrics import MetricsWindow

    with fake_nccl(rank=1) as nccl:
        window = MetricsWindow(torch.device("cpu"))
        window.steps = 1
        own = dict.fromkeys(("own_ms", "loss_ms", "backward_ms", "optimizer_ms", "step_ms_p50", "step_ms_p95"), 1.0)
        metrics, rows = window.summary(8, own)
        assert len(rows) == 2 and "perf/startup_wait_ms" in metrics
        watch = Bottlenecks(tmp_path, Config().data, "cuda", is_main=False)
        assert len(watch.watch.hosts) == 2
    assert [c["name"] for c in nccl.calls] == ["all_gather_single", "all_gather_object"]
