"""Process-group set-up, agreement across ranks, the autograd-aware all-gather, local torchrun.

Every launcher (``simclr train``, plain torchrun, the submitit job) ends up with torchrun-style
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); this module reads
only those, so there is one way in. With none set the run is a single process.
"""

from __future__ import annotations

import datetime
import os
import shlex
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

from data_pipeline.resume_policy import setting
from trainer.device import choose_device
from trainer.logs import configure as configure_logs
from trainer.logs import get_logger

log = get_logger()


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = setting("auto")
    timeout_s: float = setting(600.0)  # a dead or stuck rank ends the job after this long, not a hang
    # NCCL's flight recorder: each rank's last N collectives, dumped into the run folder when one times
    # out (what each rank was waiting in); 0 turns it off. gloo has none.
    flight_recorder_entries: int = setting(2000)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# environment variables that say a launcher started this process (torchrun, SLURM, MPI); ours says so
# with an argument (``launched``)
LAUNCHER_MARKS = ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


FLIGHT_RECORDER_PREFIX = "nccl_trace_rank_"  # + the rank: NCCL's flight recorder dumps in the run folder


def flight_recorder_env(run_dir: Path | None, entries: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that turn NCCL's flight recorder on: the last ``entries`` collectives of each
    rank kept, and dumped to ``run_dir/nccl_trace_rank_<R>`` when a collective times out. A setting
    already in ``environ`` (under today's name or the deprecated ``TORCH_NCCL_*`` one) is left as it
    is. Empty when off or without a run folder."""
    if not entries or run_dir is None:
        return {}
    environ = os.environ if environ is None else environ
    wanted = {("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"): str(entries),
              ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"): str(Path(run_dir).resolve() /
                                                                               FLIGHT_RECORDER_PREFIX),
              ("TORCH_NCCL_DUMP_ON_TIMEOUT",): "1"}
    return {names[0]: value for names, value in wanted.items() if not any(n in environ for n in names)}


def flight_recorder_dumps(run_dir: Path | None) -> str | None:
    """A sentence naming the flight recorder's dumps in ``run_dir`` and how to read them; None if none."""
    if run_dir is None or not any(Path(run_dir).glob(f"{FLIGHT_RECORDER_PREFIX}*")):
        return None
    return (f"NCCL's flight recorder dumped what each rank last ran in {Path(run_dir) / FLIGHT_RECORDER_PREFIX}* "
            f"(read them with: torchfrtrace {shlex.quote(str(run_dir))} -p {FLIGHT_RECORDER_PREFIX})")


def init_distributed(cfg: DistConfig, device_preference: str = "auto", launched: bool = False,
                     run_dir: Path | None = None) -> DistInfo:
    """Join the process group described by the environment (or run alone); ``launched``: started by
    our local launcher (which names a rank that does not come). On NCCL, the flight recorder is on
    (``cfg.flight_recorder_entries``) and dumps into ``run_dir``; a variable the user set wins."""
    configure_logs()  # RANK may have been set since the import (submitit exports SLURM's on the task)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world_size > 1 and missing:  # a leftover of another job: init would wait dist.timeout_s for ranks never coming
        from trainer.dataclass_yaml import ConfigError

        raise ConfigError(f"WORLD_SIZE={world_size} is set in this shell but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: a leftover of another job? Run `unset "
                          "WORLD_SIZE` for one process, or start ranks with simclr train --nproc K (or torchrun)")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if backend == "nccl":  # read when the process group is made
            os.environ.update(flight_recorder_env(run_dir, cfg.flight_recorder_entries))
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        by_hand = not launched and not any(name in os.environ for name in LAUNCHER_MARKS)  # or leftovers
        if by_hand:
            log.warning(f"WORLD_SIZE={world_size} RANK={rank} MASTER_ADDR/MASTER_PORT={where} are set in this shell "
                        f"(no launcher set them): waiting up to dist.timeout_s={cfg.timeout_s:g} s for the other "
                        "ranks. If they are leftovers of another job: unset WORLD_SIZE RANK MASTER_ADDR MASTER_PORT")
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        except (dist.DistStoreError, dist.DistNetworkError) as exc:
            if not by_hand:  # a launcher names the rank that did not come, from what it sees of them all
                raise
            from trainer.dataclass_yaml import ConfigError

            said = str(exc).splitlines()[0][:200]
            raise ConfigError(f"rank {rank} could not join a process group of WORLD_SIZE={world_size} at {where} "
                              f"within dist.timeout_s={cfg.timeout_s:g} s ({said}); start every rank with simclr train "
                              "--nproc K, torchrun or simclr submit, or unset WORLD_SIZE RANK MASTER_ADDR MASTER_PORT "
                              "to run one process") from None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def any_rank(*flags: torch.Tensor | bool) -> list[bool]:
    """For each flag, whether it is set on any rank (one MAX all-reduce), read on the host. Every
    rank must call this at the same point: it is how all ranks agree to stop together. A host
    read: the training step uses ``max_over_ranks`` instead and reads nothing."""
    device = next((f.device for f in flags if isinstance(f, torch.Tensor)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def max_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` (a device tensor) replaced in place by its maximum over ranks; nothing is read
    on the host (the all-reduce is queued on the device like any kernel)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


T = TypeVar("T")


def on_rank_zero(action: Callable[[], T], shared_errors: tuple[type[Exception], ...]) -> T | None:
    """``action()`` on rank 0 only (None elsewhere). An error of ``shared_errors`` it raises is
    raised on every rank, same type and message: the others would otherwise wait in their next
    collective until the timeout. Every rank must call this at the same point."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return action()
    result, said, failure = None, [None], None
    if dist.get_rank() == 0:
        try:
            result = action()
        except shared_errors as exc:
            kind = next(i for i, error_type in enumerate(shared_errors) if isinstance(exc, error_type))
            failure, said = exc, [(kind, str(exc))]
    dist.broadcast_object_list(said, src=0)
    if failure is not None:
        raise failure
    if said[0] is not None:
        kind, message = said[0]
        raise shared_errors[kind](message)
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, program: list[str], port: int | None = None) -> list[str]:
    """The command that starts ``nproc`` local ranks of ``program`` (``["-m", "trainer", ...]`` or a
    script and its arguments) with torchrun, rendezvous on 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", *program]


# torch >= 2.14 renames all_gather_into_tensor (and warns on the old name); older releases lack the new one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank's loss depends on every rank's rows, so the gradient of a local row is the
        # sum over ranks of their losses' gradients: all-reduce, then keep our slice.
        grad = grad_out.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` (same length everywhere), one row per rank: one all-gather (a
    collective: every rank calls it); alone, a single row."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.view(1, -1)
    out = tensor.new_empty(dist.get_world_size() * tensor.numel())
    _all_gather_single(out, tensor.contiguous())
    return out.view(dist.get_world_size(), -1)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) over ranks along dim 0, differentiably.

    The backward pass sums gradients over ranks; DDP's gradient averaging then divides by the
    world size, so the step equals one process optimising the mean of all ranks' losses.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


# what a collective raises when another rank (or its node) left or hung: gloo's and NCCL's transport
# errors arrive as plain RuntimeErrors, so their words are the evidence
LOST_PEER_SIGNS = ("distbackenderror", "disterror", "connection closed by peer", "connection reset", "broken pipe",
                   "gloo/transport", "nccl communicator was aborted", "socket timeout", "timed out", "timeout")


def lost_peer(error: BaseException | str) -> bool:
    """Whether a rank's failure (its exception, or the traceback a launcher collected) is only the
    loss of a peer, a consequence of another rank's death, not a cause. One rule for every launcher."""
    if isinstance(error, dist.DistError):
        return True
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(sign in text.lower() for sign in LOST_PEER_SIGNS)
