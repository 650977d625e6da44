"""An NCCL process group on a machine with no GPU: the rules NCCL enforces, checked on every call.

``FakeCuda`` makes "CUDA" tensors that hold their data on the CPU but say ``device == cuda:K``
(creation with ``device="cuda..."``, ``.to("cuda")``, ``.cuda()``; ``.cpu()`` and ``.to("cpu")``
bring them back). Mixing one with a CPU tensor that is not a 0-d scalar fails, as on a GPU.
``FakeNccl`` stands in for ``torch.distributed`` as a group whose backend reports "nccl": each
collective refuses what NCCL refuses (a CPU tensor: "No backend type associated with device type
cpu"; a tensor on another rank's device; a non-contiguous tensor; an object collective or barrier
before the current device is this rank's) and records what it was given. The other ranks are
simulated as holding what this rank holds.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode


class FakeCudaTensor(torch.Tensor):
    """CPU data that says it lives on ``cuda:<index>``."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    fake_index: int = 0

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", self.fake_index)


def _wrap(t: torch.Tensor, index: int) -> torch.Tensor:
    out = t.as_subclass(FakeCudaTensor)
    out.fake_index = index
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, FakeCudaTensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _cuda_index(device: Any, current: int) -> int | None:
    """The CUDA index ``device`` names (None: not CUDA)."""
    if isinstance(device, int):
        return device
    if isinstance(device, (str, torch.device)):
        device = torch.device(device)
        if device.type == "cuda":
            return current if device.index is None else device.index
    return None


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class FakeCuda(TorchFunctionMode):
    def __init__(self, state: NcclState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        inputs = _tensors(list(args) + list(kwargs.values()))
        fake = [t for t in inputs if isinstance(t, FakeCudaTensor)]
        target = None  # the CUDA index the result goes to
        if "device" in kwargs:
            target = _cuda_index(kwargs["device"], self.state.current)
            if target is not None:
                kwargs["device"] = "cpu"
        if name == "to":
            moved = [i for i, a in enumerate(args[1:], 1) if isinstance(a, (str, torch.device, int))]
            if moved:
                index = _cuda_index(args[moved[0]], self.state.current)
                args = (*args[: moved[0]], "cpu", *args[moved[0] + 1:])
                target = index if index is not None else -1  # -1: to the CPU
        if name == "cuda":
            target, args = (args[1] if len(args) > 1 else self.state.current), args[:1]
            func = torch.Tensor.clone
        if name == "cpu":
            target = -1
        if target is None and fake:
            cpu_inputs = [t for t in inputs if not isinstance(t, FakeCudaTensor) and t.ndim > 0]
            indexes = {t.fake_index for t in fake}
            if cpu_inputs and name not in ("copy_", "__setitem__", "__set__", "__get__"):
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"cuda:{fake[0].fake_index} and cpu! ({name})")
            if len(indexes) > 1:
                raise RuntimeError(f"Expected all tensors to be on the same device ({name})")
            target = fake[0].fake_index
        out = func(*_plain(args), **_plain(kwargs))
        if target is None or target == -1:
            return out
        if isinstance(out, torch.Tensor) and not isinstance(out, torch.nn.Parameter):
            return _wrap(out, target)
        if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            return type(out)(_wrap(o, target) for o in out)
        return out


@dataclass
class NcclState:
    world_size: int
    rank: int
    current: int = 0  # torch.cuda.current_device()
    set_devices: list[int] = field(default_factory=list)  # every torch.cuda.set_device, in order
    calls: list[dict[str, Any]] = field(default_factory=list)  # every collective: name, devices, dtypes
    groups: list[tuple[int, ...]] = field(default_factory=list)  # every new_group's ranks, in order


class NcclRuleBroken(RuntimeError):
    pass


class FakeNccl:
    """The collectives of a ``world_size``-rank NCCL group seen from ``rank`` (its device: cuda:<LOCAL_RANK>)."""

    def __init__(self, state: NcclState) -> None:
        self.state = state

    @property
    def own_device(self) -> int:
        return int(os.environ.get("LOCAL_RANK", self.state.rank))

    def _check(self, name: str, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device.type != "cuda":
                raise NcclRuleBroken(f"{name}: No backend type associated with device type {t.device.type}")
            if t.device.index != self.own_device:
                raise NcclRuleBroken(f"{name}: a tensor on cuda:{t.device.index}, this rank's device is "
                                     f"cuda:{self.own_device}")
            if not t.is_contiguous():
                raise NcclRuleBroken(f"{name}: Tensors must be contiguous")
            if t.is_complex():
                raise NcclRuleBroken(f"{name}: complex tensors are not reduced by NCCL")
        self.state.calls.append({"name": name, "devices": [str(t.device) for t in tensors],
                                 "dtypes": [t.dtype for t in tensors], "shapes": [tuple(t.shape) for t in tensors]})

    def _check_current(self, name: str) -> None:
        if self.state.current != self.own_device:
            raise NcclRuleBroken(f"{name}: the current CUDA device is cuda:{self.state.current}, not this rank's "
                                 f"cuda:{self.own_device}: object collectives pickle into the current device")
        self.state.calls.append({"name": name, "devices": [f"cuda:{self.state.current}"], "dtypes": [],
                                 "shapes": []})

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):  # noqa: ANN001
        self._check("all_reduce", tensor)
        self.state.calls[-1]["group"] = group
        if op == dist.ReduceOp.SUM:
            with torch.no_grad():
                tensor.mul_(self.state.world_size)
        elif op not in (dist.ReduceOp.MAX, dist.ReduceOp.MIN):
            raise NcclRuleBroken(f"all_reduce: op {op} not simulated")

    def all_gather_into(self, out, tensor, group=None, async_op=False):  # noqa: ANN001
        self._check("all_gather_single", out, tensor)
        if out.numel() != tensor.numel() * self.state.world_size:
            raise NcclRuleBroken("all_gather_single: output size is not world_size x input size")
        with torch.no_grad():
            out.copy_(tensor.reshape(-1).repeat(self.state.world_size).view_as(out))

    def all_gather(self, tensors, tensor, group=None, async_op=False):  # noqa: ANN001
        self._check("all_gather", tensor, *tensors)
        for t in tensors:
            t.copy_(tensor)

    def all_gather_object(self, out, obj, group=None):  # noqa: ANN001
        self._check_current("all_gather_object")
        out[:] = [copy.deepcopy(obj) for _ in range(self.state.world_size)]

    def broadcast_object_list(self, box, src=0, group=None, device=None):  # noqa: ANN001
        self._check_current("broadcast_object_list")
        if self.state.rank != src:
            box[:] = [copy.deepcopy(v) for v in self.state.broadcast_from_src]  # what rank src holds

    def new_group(self, ranks=None, **kwargs):  # noqa: ANN001
        """A handle naming its ranks (every rank must make every group, so all are recorded)."""
        self.state.groups.append(tuple(ranks))
        return ("group", tuple(ranks))

    def barrier(self, group=None, async_op=False, device_ids=None):  # noqa: ANN001
        if device_ids != [self.own_device]:
            raise NcclRuleBroken(f"barrier: device_ids={device_ids}: NCCL would guess the device from the rank")
        self._check_current("barrier")


@contextmanager
def fake_nccl(world_size: int = 2, rank: int = 0, local_rank: int | None = None,
              broadcast_from_src: list | None = None):
    """Inside: a process group whose backend reports "nccl", this process its ``rank`` with
    LOCAL_RANK ``local_rank`` (default: the rank); yields the ``NcclState`` with every call seen."""
    from foundation import collectives

    state = NcclState(world_size, rank)
    state.broadcast_from_src = broadcast_from_src or [None]  # type: ignore[attr-defined]
    group = FakeNccl(state)
    local = str(rank if local_rank is None else local_rank)

    def set_device(device: Any) -> None:
        index = _cuda_index(device, state.current)
        state.current = index
        state.set_devices.append(index)

    patches = [
        mock.patch.dict(os.environ, {"LOCAL_RANK": local}),
        mock.patch.object(dist, "is_available", lambda: True),
        mock.patch.object(dist, "is_initialized", lambda: True),
        mock.patch.object(dist, "get_backend", lambda group=None: "nccl"),
        mock.patch.object(dist, "get_world_size", lambda group=None: world_size),
        mock.patch.object(dist, "get_rank", lambda group=None: rank),
        mock.patch.object(dist, "all_reduce", group.all_reduce),
        mock.patch.object(dist, "all_gather_into_tensor", group.all_gather_into),
        mock.patch.object(dist, "all_gather", group.all_gather),
        mock.patch.object(dist, "all_gather_object", group.all_gather_object),
        mock.patch.object(dist, "broadcast_object_list", group.broadcast_object_list),
        mock.patch.object(dist, "barrier", group.barrier),
        mock.patch.object(dist, "new_group", group.new_group),
        mock.patch.object(torch.cuda, "set_device", set_device),
        mock.patch.object(torch.cuda, "current_device", lambda: state.current),
        mock.patch.object(collectives, "_bound_device", None),
    ]
    if hasattr(dist, "all_gather_single"):
        patches.append(mock.patch.object(dist, "all_gather_single", group.all_gather_into))
    for p in patches:
        p.start()
    try:
        with FakeCuda(state):
            yield state
    finally:
        for p in reversed(patches):
            p.stop()
