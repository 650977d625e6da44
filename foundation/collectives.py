"""Every collective of the product, and the rules for where its tensors live.

gloo forgives what NCCL does not, and every CPU test runs gloo. So each collective goes through
one of these helpers, which own NCCL's rules:

- **NCCL moves CUDA tensors only.** A host figure or flag (a Python value, a CPU tensor) travels
  on ``collective_device()`` (the current CUDA device under NCCL, the CPU under gloo) and comes
  back where the caller gave it. We chose this over a second, gloo group for host data (as some
  large codebases keep): one group is one rendezvous, one timeout and one flight recorder, and the
  host values here are a few numbers read at log steps and stop checks, where the step waits for
  the device anyway.
- **Object collectives pickle into a tensor on the current CUDA device**, so that device must be
  this rank's before each one (else every rank of a node uses cuda:0: a hang or a wrong answer).
  They are for plain Python values: a CUDA tensor inside an object arrives on the sender's device
  index; send tensors with ``gather_rows`` / ``gather_varying`` instead.
- **Contiguous tensors of the types NCCL reduces**: a non-contiguous tensor goes through a
  contiguous copy; bool is reduced as uint8; the average is a sum divided here (gloo has no AVG).
- **No shortcut hides a collective.** Whenever a process group exists, the collective runs, world
  size 1 included: a one-GPU NCCL job runs every collective a 64-GPU job runs, in the same order.
  Without a group (one process, no launcher) each helper returns its input's one-rank answer.

``trainer.model.sync_batchnorm``'s two all-reduces (inside its autograd function) are
``all_reduce_`` calls on the group ``subgroup()`` made for it. A test fails on any
``dist.<collective>(`` elsewhere in the product (``tests/test_collectives.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
Op = Literal["sum", "max", "min", "avg"]

CUDA_ONLY_BACKENDS = ("nccl",)  # backends with no CPU transport
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "avg": "SUM"}  # avg: a sum, divided here (gloo has no AVG)
_bound_device: torch.device | None = None  # this rank's CUDA device, said by whoever made the group


def bind_device(device: torch.device) -> None:
    """Say which CUDA device this rank's collectives use (``trainer.runtime.distributed`` does, when it makes
    the group); object collectives set it as current before each call."""
    global _bound_device
    _bound_device = device if device.type == "cuda" else None


def active() -> bool:
    """Whether a process group exists (then every helper runs its collective, even alone)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def cuda_only() -> bool:
    """Whether the group's backend moves CUDA tensors only (NCCL)."""
    return active() and str(dist.get_backend()) in CUDA_ONLY_BACKENDS


def _rank_device() -> torch.device:
    """This rank's CUDA device: the one bound at the group's making, else LOCAL_RANK's."""
    if _bound_device is not None:
        return _bound_device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def collective_device() -> torch.device:
    """Where host data travels in this group: this rank's CUDA device under NCCL, else the CPU."""
    return _rank_device() if cuda_only() else torch.device("cpu")


def _set_current_device() -> None:
    if cuda_only():
        torch.cuda.set_device(_rank_device())


def _reduce_op(op: Op) -> Any:
    return getattr(dist.ReduceOp, _OPS[op])


def all_reduce_(tensor: torch.Tensor, op: Op = "sum", group: Any = None) -> torch.Tensor:
    """``tensor`` replaced in place by its reduction over the ranks of ``group`` (None: all; a
    ``subgroup()``), with ``op``, and returned. A device tensor is reduced where it is, nothing read
    on the host; a CPU tensor under NCCL travels on the rank's device and comes back."""
    if not active():
        return tensor
    target = collective_device() if tensor.device.type == "cpu" else tensor.device
    work = tensor if tensor.device == target and tensor.is_contiguous() else tensor.to(target).contiguous()
    if work.dtype == torch.bool:  # NCCL reduces no bool: as int32 (never wraps), read back as "any rank"
        work = work.to(torch.int32)
    dist.all_reduce(work, op=_reduce_op(op), group=group)
    if op == "avg":
        ranks = dist.get_world_size(group)
        work = work / ranks if work.is_floating_point() else work // ranks
    if work is not tensor:
        tensor.copy_(work.to(tensor.dtype) if tensor.dtype == torch.bool else work)
    return tensor


def agree_any(*flags: torch.Tensor | bool) -> list[bool]:
    """For each flag (a Python bool or a one-element tensor anywhere), whether it is set on any
    rank: one MAX all-reduce on the collective device, read on the host. Every rank calls it at the
    same point: it is how all ranks agree to stop together."""
    device = collective_device()
    values = torch.stack([torch.as_tensor(f).to(device=device, dtype=torch.float32).reshape(()) for f in flags])
    return [bool(v) for v in all_reduce_(values, "max").tolist()]


def _all_gather_into(out: torch.Tensor, tensor: torch.Tensor) -> None:
    # torch >= 2.14 renames all_gather_into_tensor (and warns on the old name); older releases lack the new one
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` (the same length everywhere), one row per rank, on the device
    ``tensor`` was given on: one all-gather."""
    if not active():
        return tensor.reshape(1, -1)
    home = tensor.device
    target = collective_device() if home.type == "cpu" else home
    work = tensor.reshape(-1).to(target).contiguous()
    out = work.new_empty(world_size() * work.numel())
    _all_gather_into(out, work)
    return out.view(world_size(), -1).to(home)


def gather_varying(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (any length along dim 0, the rest alike), in rank order, on the
    device it was given on. NCCL's all-gather takes equal sizes only: the lengths are gathered
    first, each share padded to the longest, then trimmed."""
    if not active():
        return [tensor]
    home = tensor.device
    target = collective_device() if home.type == "cpu" else home
    sizes = [int(n) for n in gather_rows(torch.tensor([len(tensor)], device=target)).reshape(-1).tolist()]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]), device=target)
    padded[: len(tensor)] = tensor.to(target)
    rows = gather_rows(padded.reshape(-1)).view(len(sizes), *padded.shape)
    return [rows[r, : sizes[r]].to(home) for r in range(len(sizes))]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_into(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank's loss depends on every rank's rows, so the gradient of a local row is the
        # sum over ranks of their losses' gradients: all-reduce, then keep our slice.
        grad = grad_out.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (a device tensor, the same shape on every rank) over ranks along dim
    0, differentiably. The backward pass sums gradients over ranks; DDP's gradient averaging then
    divides by the world size, so the step equals one process optimising the mean of all ranks' losses."""
    if not active():
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (plain Python values, pickled), in rank order."""
    if not active():
        return [obj]
    _set_current_device()
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (plain Python values) on every rank; the others' ``obj`` is ignored."""
    if not active():
        return obj
    _set_current_device()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Every rank waits here for all the others. Under NCCL the barrier names this rank's device
    (else NCCL guesses it from the rank, wrong where ranks do not map to devices one to one)."""
    if not active():
        return
    if cuda_only():
        _set_current_device()
        dist.barrier(device_ids=[_rank_device().index])
    else:
        dist.barrier()


def subgroup(rank_lists: Sequence[Sequence[int]]) -> Any:
    """This rank's group among ``rank_lists`` (disjoint lists covering the ranks, such as SyncBatchNorm's
    blocks of K), or None for the whole world (one list, or no process group: the default group).
    Making a group is itself collective: every rank makes every group, in the same order."""
    if not active() or len(rank_lists) <= 1:
        return None
    mine = None
    for ranks in rank_lists:
        handle = dist.new_group(list(ranks))
        if rank() in ranks:
            mine = handle
    return mine


def on_rank_zero(action: Callable[[], T], shared_errors: Sequence[type[Exception]]) -> T | None:
    """``action()`` on rank 0 only (None elsewhere). An error of ``shared_errors`` it raises is
    raised on every rank, same type and message: the others would otherwise wait in their next
    collective until the timeout. Every rank calls this at the same point."""
    if not active():
        return action()
    result, said, failure = None, None, None
    if rank() == 0:
        try:
            result = action()
        except tuple(shared_errors) as exc:
            kind = next(i for i, error_type in enumerate(shared_errors) if isinstance(exc, error_type))
            failure, said = exc, (kind, str(exc))
    said = broadcast_object(said)
    if failure is not None:
        raise failure
    if said is not None:
        kind, message = said
        raise shared_errors[kind](message)
    return result
