"""Which device a process runs on, and what it has used: the one place that asks torch.cuda."""

from __future__ import annotations

import resource

import torch

from trainer.runtime.dataclass_yaml import ConfigError


def choose_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``cuda`` when asked for or, with ``auto``, when a GPU is visible; else the CPU.

    Clusters set GPUs up in two ways, and both work: every task of a node sees all its GPUs (this
    rank takes GPU ``local_rank``), or each task sees only its own (``CUDA_VISIBLE_DEVICES`` holds
    one device, which is index 0 whatever LOCAL_RANK is).
    """
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible to this process; use train.device=cpu "
                          "(or auto), or check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)")
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this process sees only {visible} GPUs; start at most "
                          f"{visible} ranks per node, or give each task its own GPU (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank)


def check_backend(backend: str, device_type: str, preference: str = "auto") -> None:
    """NCCL moves CUDA tensors only: on CPU ranks it fails inside torch's init (a traceback from
    every rank), so say it first, with the fix."""
    if backend == "nccl" and device_type != "cuda":
        why = "train.device=cpu" if preference == "cpu" else "no CUDA device is visible to this process"
        raise ConfigError(f"dist.backend=nccl moves CUDA tensors only, but the ranks would run on the CPU ({why}); "
                          "use dist.backend=auto (gloo on the CPU, NCCL on GPUs) or gloo, or train.device=cuda on "
                          "a GPU node")


def check_local_ranks(nproc: int, preference: str = "auto", backend: str = "auto") -> None:
    """``--nproc``, for every command that starts local ranks: at least one, and, before any rank
    starts, no more CUDA ranks than visible GPUs (ranks would share a GPU, which NCCL refuses
    ("duplicate GPU") after every rank has started)."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: the number of local ranks must be at least 1")
    uses_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    check_backend(backend, "cuda" if uses_cuda else "cpu", preference)
    if nproc <= 1 or not uses_cuda or backend == "gloo":
        return
    choose_device(preference)  # no GPU at all: that error first
    visible = torch.cuda.device_count()
    if nproc > visible:
        raise ConfigError(f"--nproc {nproc} starts {nproc} ranks on this node but only {visible} GPU(s) are "
                          f"visible, and NCCL cannot put two ranks on one GPU; use --nproc {visible} or fewer (one "
                          "rank per GPU), or train.device=cpu for CPU ranks")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_in_use_mb(device: torch.device) -> dict[str, float | None]:
    """What the whole process holds beyond torch's own allocator, where the system can tell: the
    device memory in use (total minus free: torch's cache, DALI's pools, nvJPEG, the CUDA context;
    on one GPU per process this is the process's) and the host memory locked or pinned (Linux's
    VmLck + VmPin; CUDA may pin without either, then None)."""
    in_use = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use = (total - free) / 2**20
    pinned = 0.0
    try:
        for line in open("/proc/self/status"):
            if line.startswith(("VmLck:", "VmPin:")):
                pinned += int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"device_in_use_mb": in_use, "host_pinned_mb": pinned or None}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
