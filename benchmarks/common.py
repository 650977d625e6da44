"""What every benchmark shares: the results folder, the device's name, timing with warm-up, a
robust summary, and the header (device, library versions, commit) every result JSON carries."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.device import synchronize
from trainer.tracking import git_commit, library_versions

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones (GPU work
    included: the device is synchronised around each call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    """Median and the 25-75% spread (a noisy machine's outliers do not move them much)."""
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "p25_s": q[0], "p75_s": q[2], "n": len(samples)}


def result_header(benchmark: str, device: str) -> dict[str, Any]:
    return {"benchmark": benchmark, "device": device, "versions": library_versions(), "git_commit": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out
