"""Which device a process runs on, and what it has used: the one place that asks torch.cuda."""

from __future__ import annotations

import resource

import torch


def choose_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``cuda`` (GPU ``local_rank``) when asked for or, with ``auto``, when one is visible; else the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
