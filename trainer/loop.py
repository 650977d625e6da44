"""The training entry point: every launcher (``simclr train``, torchrun, the SLURM job) calls ``train``."""

from __future__ import annotations

import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from data_pipeline import build_loader, resolve_backend
from trainer import checkpoint as ckpt
from trainer.config import Config, config_to_dict, dump_config, flatten
from trainer.distributed import DistInfo, init_distributed, teardown
from trainer.loss import nt_xent
from trainer.model import build_model, encoder_state_dict
from trainer.optim import build_optimizer
from trainer.schedule import build_schedule
from trainer.tracking import Tracker, git_commit, library_versions

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    loss: float
    run_dir: Path
    run_id: str | None
    encoder_path: Path | None
    preempted: bool = False
    skipped_nonfinite: int = 0
    skipped_overflow: int = 0


_stop_requested = False


def request_stop() -> None:
    """Ask the loop to checkpoint and return at the next step (signal handlers call this)."""
    global _stop_requested
    _stop_requested = True


def _seed_everything(seed: int, rank: int) -> None:
    torch.manual_seed(seed)  # same model init on every rank (DDP also broadcasts it)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gather_rng(info: DistInfo) -> list:
    state = ckpt.capture_rng()
    if not info.distributed:
        return [state]
    states: list = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _check_compatible(state: dict, cfg: Config, path: Path) -> None:
    saved, wanted = state["config"], config_to_dict(cfg)
    if saved.get("model") != wanted["model"]:
        raise ckpt.CheckpointError(f"checkpoint {path} was trained with model={saved.get('model')}, this run asks "
                                   f"for {wanted['model']}; use the same model settings or checkpoint.resume=none "
                                   "with a new train.run_dir")
    if saved["data"]["batch_size"] != cfg.data.batch_size:
        raise ckpt.CheckpointError(f"checkpoint {path} used data.batch_size={saved['data']['batch_size']}, "
                                   f"this run {cfg.data.batch_size}: the data position would not match")


def train(cfg: Config, on_start: Callable[[Tracker, DistInfo], None] | None = None) -> TrainResult:
    """Pretrain SimCLR with the resolved ``cfg`` in this process (one rank of the job)."""
    global _stop_requested
    _stop_requested = False
    info = init_distributed(cfg.dist, cfg.train.device)
    try:
        return _train(cfg, info, on_start)
    finally:
        teardown()


def _train(cfg: Config, info: DistInfo, on_start) -> TrainResult:
    run_dir = Path(cfg.train.run_dir)
    device = info.device
    _seed_everything(cfg.train.seed, info.rank)
    loader = build_loader(cfg.data, cfg.train.seed, info.rank, info.world_size, device)
    model = build_model(cfg.model, device, info.world_size, info.rank)
    ddp_model = model
    if info.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            gradient_as_bucket_view=True)
    spe = loader.steps_per_epoch
    schedule = build_schedule(cfg.optim, cfg.data.batch_size, spe, cfg.train.epochs)
    optimizer = build_optimizer(model, cfg.optim, schedule(0))
    amp_dtype = AUTOCAST_DTYPES[cfg.precision.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision.dtype == "fp16")

    step, run_id = 0, None
    path, state = ckpt.find_resume_checkpoint(run_dir, cfg.checkpoint.resume)
    if state is not None:
        _check_compatible(state, cfg, path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, run_id = state["step"], state.get("mlflow_run_id")
        rng = state.get("rng") or []
        if len(rng) == info.world_size:
            ckpt.restore_rng(rng[info.rank])
        if info.is_main:
            print(f"[simclr] resumed from {path} at step {step}", flush=True)

    tracker = Tracker(cfg.tracking, run_dir, active=info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        params = {**flatten(config_to_dict(cfg)), "world_size": info.world_size,
                  "data.backend_resolved": resolve_backend(cfg.data, device), "steps_per_epoch": spe,
                  "git_commit": git_commit(), **{f"version.{k}": v for k, v in library_versions().items()}}
        run_id = tracker.start(params, {"simclr.device": str(device)}, run_id=run_id)
        if state is None:
            tracker.log_artifact(run_dir / "config.yaml")
    if on_start is not None:
        on_start(tracker, info)

    def save(at_step: int) -> None:
        rng = _gather_rng(info)  # collective: every rank calls save at the same steps
        if info.is_main:
            ckpt.save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "step": at_step, "epoch": at_step // spe, "step_in_epoch": at_step % spe,
                "world_size": info.world_size, "rng": rng, "config": config_to_dict(cfg),
                "mlflow_run_id": tracker.run_id,
            }, ckpt.checkpoint_dir(run_dir), cfg.checkpoint.keep_last)

    total = schedule.total
    stop_at = min(total, cfg.train.stop_after_steps) if cfg.train.stop_after_steps else total
    bar = None
    if info.is_main and cfg.train.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=stop_at, initial=step, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr)

    model.train()
    loss_sum = torch.zeros((), device=device)
    acc_sum = torch.zeros((), device=device)
    window_steps, wait_time, window_start = 0, 0.0, time.perf_counter()
    last_loss, nonfinite_total, nonfinite_run, overflow_total = float("nan"), 0, 0, 0
    preempted = False
    while step < stop_at and not preempted:
        loader.set_epoch(step // spe, step % spe)
        t_ready = time.perf_counter()
        for view1, view2, _ in loader:
            wait_time += time.perf_counter() - t_ready
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            images = torch.cat([view1, view2])  # one forward: BN sees both views, as in SimCLR
            if device.type == "cuda" and cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                z1, z2 = ddp_model(images).chunk(2)
            loss, acc = nt_xent(z1, z2, cfg.loss.temperature, gather=cfg.loss.gather_negatives)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # One small collective per step so every rank agrees to skip a bad step or to stop.
            flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                                 torch.tensor(float(_stop_requested), device=device)])
            if info.distributed:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, stop_flag = flags.tolist()
            if bad:
                nonfinite_total += 1
                nonfinite_run += 1
                optimizer.zero_grad(set_to_none=True)
                if nonfinite_run >= cfg.precision.max_consecutive_nonfinite:
                    tracker.finish("FAILED")
                    raise NonFiniteLossError(
                        f"{nonfinite_run} consecutive steps had a non-finite loss (last at step {step}); the "
                        f"last good checkpoint in {ckpt.checkpoint_dir(run_dir)} is intact. Lower optim.lr, "
                        "raise loss.temperature or use precision.dtype=bf16/fp32, then resume.")
            else:
                nonfinite_run = 0
                scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
                scaler.step(optimizer)
                scaler.update()
                if scaler.is_enabled() and scaler.get_scale() < scale_before:
                    overflow_total += 1  # the scaler skipped this step: inf/nan gradients
                loss_sum += loss.detach()
                acc_sum += acc
            step += 1
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.train.log_every == 0 or step == stop_at:
                stats = torch.stack([loss_sum, acc_sum]) / max(1, window_steps)
                if info.distributed:
                    dist.all_reduce(stats)
                    stats /= info.world_size
                elapsed = time.perf_counter() - window_start
                last_loss, last_acc = stats.tolist()
                metrics = {"loss": last_loss, "contrastive_acc": last_acc, "lr": schedule(step - 1),
                           "images_per_s": cfg.data.batch_size * window_steps / elapsed,
                           "data_wait_fraction": wait_time / elapsed, "peak_memory_mb": _peak_memory_mb(device),
                           "epoch": step / spe, "skipped_nonfinite": nonfinite_total,
                           "skipped_overflow": overflow_total,
                           "skipped_corrupt_images": loader.corrupt_skipped}
                tracker.log_metrics(metrics, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
                loss_sum.zero_()
                acc_sum.zero_()
                window_steps, wait_time, window_start = 0, 0.0, time.perf_counter()
            if cfg.train.knn_every_epochs and step % (spe * cfg.train.knn_every_epochs) == 0 and cfg.data.val_root:
                if info.is_main:  # the other ranks wait at the barrier (within dist.timeout_s)
                    from trainer.evaluate import knn_monitor

                    tracker.log_metrics({"knn_top1": knn_monitor(model.encoder, cfg.data, device)}, step)
                if info.distributed:
                    dist.barrier()
            if stop_flag:
                preempted = True
            # No checkpoint inside a streak of skipped steps: the last one on disk stays a healthy state.
            if (step % cfg.checkpoint.every_steps == 0 or step == stop_at or preempted) and not nonfinite_run:
                save(step)
            if step >= stop_at or preempted:
                break
            t_ready = time.perf_counter()
    if bar is not None:
        bar.close()

    encoder_path = None
    if info.is_main:
        if not preempted and step >= total:
            encoder_path = run_dir / "encoder.pt"
            torch.save(encoder_state_dict(model), encoder_path)
            tracker.log_artifact(encoder_path)
        plot = plot_curves(tracker.local_file, run_dir / "curves.png")
        if plot is not None:
            tracker.log_artifact(plot)
        tracker.finish("KILLED" if preempted else "FINISHED")
        print(f"[simclr] {'stopped' if step < total else 'finished'} at step {step}/{total}; "
              f"{tracker.describe()}", flush=True)
    return TrainResult(step, last_loss, run_dir, tracker.run_id, encoder_path, preempted,
                       nonfinite_total, overflow_total)


def plot_curves(metrics_file: Path, out: Path) -> Path | None:
    """Loss and lr against step, from the local metrics file (so it works offline too)."""
    import json

    if not metrics_file.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("loss", "contrastive_acc", "lr")):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
