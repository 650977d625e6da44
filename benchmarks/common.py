"""What every benchmark shares: the results folder, the device's name, timing with warm-up, a
robust summary, and the header (device, library versions, commit) every result JSON carries."""

from __future__ import annotations

import json
import platform
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.config import config_from_dict
from trainer.model.encoders import EncoderError, check_arch, timm_name
from trainer.run.parts import ModelParts, build_model_parts
from trainer.runtime.device import synchronize
from trainer.runtime.distributed import DistInfo
from trainer.tracking import git_commit, library_versions

RESULTS = Path(__file__).resolve().parent / "results"


def print_table(title: str, columns: list[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> None:
    """The benchmarks' one table printer: ``== title``, a header, one line per row. Each column is
    (header, format spec), e.g. ``("ms", ">10.2f")``; a cell that is a string or None ("-") keeps
    the column's alignment and width, whatever its number format."""
    def layout(spec: str) -> str:
        align = spec[0] if spec[:1] in "<>^" else ">"
        width = "".join(c for c in spec.lstrip("<>^").split(".")[0] if c.isdigit())
        return f"{align}{width}"

    if title:
        print(f"\n== {title}")
    print("".join(format(header, layout(spec)) for header, spec in columns))
    for row in rows:
        print("".join(format("-" if v is None else v, layout(spec) if v is None or isinstance(v, str) else spec)
                      for v, (_, spec) in zip(row, columns)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def benchmark_parts(arch: str, image_size: int, precision: str, info: DistInfo, micro_batch: int = 0,
                    compile_model: bool = False, cifar_stem: bool | None = None) -> ModelParts:
    """The training run's own model, optimizer (LARS), precision and forward-backward, for timing
    ``trainer.run.step.train_step`` on synthetic images (the CIFAR stem by default at 64 px and below,
    for a torchvision ResNet)."""
    torch.manual_seed(0)
    # timm encoders keep their own stems
    stem = image_size <= 64 and timm_name(arch) is None if cifar_stem is None else cifar_stem
    cfg = config_from_dict({"model": {"arch": arch, "cifar_stem": stem, "compile": compile_model},
                            "precision": {"dtype": precision}, "optim": {"name": "lars"},
                            "train": {"micro_batch": micro_batch}})
    return build_model_parts(cfg, info, lr=0.1)


def synthetic_views(groups: list[tuple[int, int]], images: int, device: torch.device) -> list[torch.Tensor]:
    """Random size groups as a loader yields them: ``groups`` holds (size, views) each."""
    return [torch.randn(views, images, 3, size, size, device=device) for size, views in groups]


def encoder_arch(text: str) -> str:
    """argparse type of ``--arch``: a torchvision ResNet or timm/<name>, checked as the config checks it."""
    import argparse

    try:
        check_arch(text)
    except EncoderError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_views(text: str) -> list[tuple[int, int]]:
    """``2x224+6x96`` -> [(224, 2), (96, 6)]: (size, views) of each size group."""
    try:
        groups = [(int(size), int(count)) for count, size in (part.split("x") for part in text.split("+"))]
    except ValueError:
        raise ValueError(f"views {text!r}: write them as COUNTxSIZE groups joined by +, e.g. 2x224+6x96") from None
    if sum(count for _, count in groups) < 2 or any(count < 1 or size < 8 for size, count in groups):
        raise ValueError(f"views {text!r}: at least 2 views in all, each group 1 view or more of 8 px or more")
    return groups


def alone_on(device: torch.device) -> DistInfo:
    """One process on ``device``."""
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device)


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


def timed_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                      iters: int) -> dict[str, list[float]]:
    """Like ``timed`` for several functions, one call of each per round, so that the machine's
    drift over the run (other load, clock changes) falls on all of them alike; the order within a
    round is shuffled (seeded), so that none always runs in the wake of the same neighbour (caches,
    memory just freed by a large step)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(iters):
        rng.shuffle(order)
        for name in order:
            samples[name] += timed(fns[name], device, 0, 1)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Median and the 25-75% spread (a noisy machine's outliers do not move them much)."""
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "p25_s": q[0], "p75_s": q[2], "n": len(samples)}


def result_header(benchmark: str, device: str) -> dict[str, Any]:
    return {"benchmark": benchmark, "device": device, "versions": library_versions(), "git_commit": git_commit(),
            "git_dirty": git_dirty(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit named (None where there is no repository)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=RESULTS.parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def keep_traces(traces: list[str], out: Path) -> list[str]:
    """Profiler traces written in temporary run folders, copied beside the result ``out`` (into
    ``<out stem>_profile/``); returns the copies' paths, for the result to name."""
    if not traces:
        return []
    folder = out.with_name(f"{out.stem}_profile")
    folder.mkdir(parents=True, exist_ok=True)
    for trace in traces:
        shutil.copy2(trace, folder / Path(trace).name)
    return [str(folder / Path(trace).name) for trace in traces]
