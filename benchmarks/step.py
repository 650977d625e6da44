"""The SimCLR training step on synthetic images: un-instrumented images/s, a phase breakdown, and
the plain supervised step of the same encoder for the SSL overhead."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import alone_on, benchmark_parts, summary, synthetic_views, timed
from trainer.config import ModelConfig, OptimConfig
from trainer.model.optim import build_optimizer, guarded_step
from trainer.model.precision import PrecisionPolicy
from trainer.model.simclr import uses_channels_last
from trainer.observe.profiling import ProfileConfig, StepProfiler
from trainer.run.grad_cache import model_input
from trainer.run.step import train_step
from trainer.runtime.device import peak_memory_mb, synchronize

PHASES = ("forward", "loss_gather", "backward_allreduce", "optimizer")


def _phase_times(parts: Any, forward: Callable[[], torch.Tensor], device: torch.device, warmup: int,
                 iters: int) -> dict[str, list[float]]:
    """The step's phases one by one (the model's forward, the loss, the backward, the optimizer),
    a device synchronise after each, the warm-up steps left out."""
    opt, policy, model = parts.optimizer, parts.precision, parts.model
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    for i in range(warmup + iters):
        marks = [time.perf_counter()]
        z = forward()
        synchronize(device)
        marks.append(time.perf_counter())
        loss, _ = parts.loss_fn(z)  # the run's loss
        synchronize(device)
        marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        policy.backward(loss)
        synchronize(device)
        marks.append(time.perf_counter())
        guarded_step(opt, policy.unscale_(model.parameters()))
        synchronize(device)
        marks.append(time.perf_counter())
        if i >= warmup:
            for name, start, end in zip(PHASES, marks, marks[1:]):
                phases[name].append(end - start)
    return phases


def _supervised_step(model: Any, one_view: torch.Tensor, labels: torch.Tensor, precision: str,
                     device: torch.device) -> Callable[[], None]:
    """The supervised step to compare with: the same encoder, one view, a linear classifier, cross-entropy."""
    encoder = model.encoder
    head = torch.nn.Linear(model.feature_dim, 1000).to(device)
    sup_opt = build_optimizer(torch.nn.ModuleList([encoder, head]), OptimConfig(name="lars"), lr=0.1)
    sup_policy = PrecisionPolicy(precision, device)

    def supervised_step() -> None:
        with sup_policy.autocast():
            loss = F.cross_entropy(head(encoder(one_view)).float(), labels)
        sup_opt.zero_grad(set_to_none=True)
        sup_policy.backward(loss)
        found_inf = sup_policy.unscale_(sup_opt.param_groups[0]["params"] + sup_opt.param_groups[1]["params"])
        guarded_step(sup_opt, found_inf)
        sup_policy.update(found_inf)

    return supervised_step


def bench_ssl_step(arch: str, image_size: int, batch_size: int, precision: str, warmup: int, iters: int,
                   device: torch.device, views: list[tuple[int, int]] | None = None,
                   profile: list[int] | None = None) -> dict:
    """The SSL step is ``trainer.run.step.train_step`` itself, on ``views`` ((size, count) size groups;
    default two views of ``image_size``). The phase breakdown takes the same parts apart, with a
    device synchronise around each phase, so the phases add up to a little more than the real
    (un-instrumented) step. ``profile`` ([START, END], as ``train.profile.steps``): after the timing,
    END more steps, START+1..END of them under the profiler; the result's ``profile`` lists the trace
    files (in a temporary folder)."""
    parts = benchmark_parts(arch, image_size, precision, alone_on(device))
    model, policy = parts.model, parts.precision
    channels_last = uses_channels_last(ModelConfig(), device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    groups = synthetic_views(views or [(image_size, 2)], batch_size, device)
    n_views = sum(g.shape[0] for g in groups)
    images = model_input(groups, channels_last)
    labels = torch.randint(0, 1000, (batch_size,), device=device)

    def forward() -> torch.Tensor:
        with policy.autocast():
            return model(images).projections.view(n_views, batch_size, -1)

    def step():  # the training step itself
        train_step(parts, groups, lr=0.1)

    full = timed(step, device, warmup, iters)
    traces = profile_steps(step, profile, device) if profile else []

    phases = _phase_times(parts, forward, device, warmup, iters)
    sup = timed(_supervised_step(model, groups[0][0].contiguous(memory_format=fmt), labels, precision, device),
                device, warmup, iters)
    ssl_median, sup_median = statistics.median(full), statistics.median(sup)
    return {
        "ssl_step": summary(full), "images_per_s": batch_size / ssl_median,
        "views_per_s": n_views * batch_size / ssl_median,
        "phases": {k: summary(v) for k, v in phases.items()},
        "supervised_step": summary(sup), "supervised_images_per_s": batch_size / sup_median,
        "ssl_over_supervised_time": ssl_median / sup_median, "peak_memory_mb": peak_memory_mb(device),
        "profile": traces,
    }


def profile_steps(step: Callable[[], Any], steps: list[int], device: torch.device) -> list[str]:
    """``steps[1]`` calls of ``step``, ``steps[0]+1..steps[1]`` of them under the profiler (the
    training run's ``StepProfiler``, writing into a temporary folder); returns the trace files."""
    profiler = StepProfiler(ProfileConfig(steps=list(steps)), 0, device, Path(tempfile.mkdtemp(prefix="simclr_bench_")))
    files: list[Path] = []
    for i in range(steps[1]):
        profiler.before_step(i)
        step()
        files += profiler.after_step(i + 1)
    return [str(f) for f in files]
