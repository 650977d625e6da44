"""Process-group set-up and tear-down, the flight recorder, local torchrun, lost peers. The
collectives themselves live in ``foundation.collectives``, with NCCL's rules.

Every launcher (``simclr train``, plain torchrun, the submitit job) ends up with torchrun-style
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); this module reads
only those, so there is one way in. With none set the run is a single process.
"""

from __future__ import annotations

import datetime
import importlib
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from foundation import collectives
from foundation.logs import configure as configure_logs
from foundation.logs import get_logger
from foundation.process_rank import launched_rank
from foundation.resume_policy import setting
from trainer.runtime.dataclass_yaml import Problem, failing
from trainer.runtime.device import check_backend, choose_device

log = get_logger()


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = setting("auto")
    timeout_s: float = setting(600.0)  # a dead or stuck rank ends the job after this long, not a hang
    # NCCL's flight recorder: each rank's last N collectives, dumped into the run folder when one times
    # out (what each rank was waiting in); 0 turns it off. gloo has none.
    flight_recorder_entries: int = setting(2000)

    def problems(self) -> list[Problem]:
        return failing([
            (self.timeout_s > 0, "dist.timeout_s", self.timeout_s, "must be > 0 seconds"),
            (self.flight_recorder_entries >= 0, "dist.flight_recorder_entries", self.flight_recorder_entries,
             "must be >= 0 (collectives NCCL's flight recorder keeps per rank; 0 turns it off)")])


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # a process group joins the ranks (a launcher started them, even one): DDP and every collective
    # run, so one rank on NCCL exercises what 64 do
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def makes_a_group(launched: bool = False) -> bool:
    """Whether ``init_distributed`` makes a process group in this environment: more than one rank, or
    a launcher's one rank (``launched``: our local launcher's); a shell's leftover ``WORLD_SIZE=1`` is neither."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    missing = any(name not in os.environ for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"))
    return "WORLD_SIZE" in os.environ and not missing and not set_by_hand(launched)


def set_by_hand(launched: bool = False) -> bool:
    """Whether the rank variables come from no launcher (typed in the shell, or a leftover)."""
    return not launched and not any(name in os.environ for name in LAUNCHER_MARKS)


def init_distributed(cfg: DistConfig, device_preference: str = "auto", launched: bool = False,
                     run_dir: Path | None = None) -> DistInfo:
    """Join the process group described by the environment (or run alone); ``launched``: started by
    our local launcher (which names a rank that does not come). A launcher's one rank (``--nproc 1``,
    torchrun, one SLURM task) makes a 1-rank group too, so that every collective runs as in a big
    job; a shell's leftover ``WORLD_SIZE=1`` does not. On NCCL, the flight recorder is on
    (``cfg.flight_recorder_entries``) and dumps into ``run_dir``; a variable the user set wins."""
    configure_logs()  # RANK may have been set since the import (submitit exports SLURM's on the task)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world_size > 1 and missing:  # a leftover of another job: init would wait dist.timeout_s for ranks never coming
        from trainer.runtime.dataclass_yaml import ConfigError

        raise ConfigError(f"WORLD_SIZE={world_size} is set in this shell but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: a leftover of another job? Run `unset "
                          "WORLD_SIZE` for one process, or start ranks with simclr train --nproc K (or torchrun)")
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    by_hand = set_by_hand(launched)
    if makes_a_group(launched) and not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        check_backend(backend, device.type, device_preference)
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if backend == "nccl":  # read when the process group is made
            os.environ.update(flight_recorder_env(run_dir, cfg.flight_recorder_entries))
        # torch._dynamo imported after the group is made (torchvision imports it) keeps the group
        # alive past destroy_process_group: its gloo threads then free the last collective's tensors
        # while the interpreter shuts down, and a finished rank dies of SIGABRT or SIGBUS.
        importlib.import_module("torch._dynamo")
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if by_hand:
            log.warning(f"WORLD_SIZE={world_size} RANK={rank} MASTER_ADDR/MASTER_PORT={where} are set in this shell "
                        f"(no launcher set them): waiting up to dist.timeout_s={cfg.timeout_s:g} s for the other "
                        "ranks. If they are leftovers of another job: unset WORLD_SIZE RANK MASTER_ADDR MASTER_PORT")
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        except (dist.DistStoreError, dist.DistNetworkError) as exc:
            if not by_hand:  # a launcher names the rank that did not come, from what it sees of them all
                raise
            from trainer.runtime.dataclass_yaml import ConfigError

            said = str(exc).splitlines()[0][:200]
            raise ConfigError(f"rank {rank} could not join a process group of WORLD_SIZE={world_size} at {where} "
                              f"within dist.timeout_s={cfg.timeout_s:g} s ({said}); start every rank with simclr train "
                              "--nproc K, torchrun or simclr submit, or unset WORLD_SIZE RANK MASTER_ADDR MASTER_PORT "
                              "to run one process") from None
    if dist.is_initialized():
        collectives.bind_device(device)
        if rank == 0:
            log.info(f"process group: {dist.get_backend()}, {world_size} rank(s)")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    distributed=dist.is_initialized())


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(nproc: int) -> str:
    """OMP_NUM_THREADS for each of ``nproc`` ranks on this node: the user's value, else the cores
    shared out (ranks that each take every core thrash one another)."""
    return os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))


def run_ranks(nproc: int, program: list[str], what: str) -> None:
    """``program`` as ``nproc`` local ranks under torchrun, each with its share of the cores, to its
    end (the benchmarks' multi-rank runs); RuntimeError with the ranks' last output when one fails."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": threads_per_rank(nproc)}
    proc = subprocess.run(torchrun_command(nproc, program), env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} on {nproc} rank(s) failed:\n{proc.stderr[-3000:]}")


def torchrun_command(nproc: int, program: list[str], port: int | None = None) -> list[str]:
    """The command that starts ``nproc`` local ranks of ``program`` (``["-m", "trainer", ...]`` or a
    script and its arguments) with torchrun, rendezvous on 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", *program]


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
