"""Everything a training run holds, declared in one place and built by one function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data_pipeline import IndexStore, ViewLoader, build_loader, open_val_source
from data_pipeline.sources import Source, data_fingerprint, labelled_indices
from foundation.logs import get_logger
from trainer.config import Config
from trainer.evaluation.online_probe import OnlineProbe
from trainer.losses import LossFn, build_loss
from trainer.model.optim import build_optimizer
from trainer.model.precision import PrecisionPolicy
from trainer.model.schedule import WarmupCosine, build_schedule
from trainer.model.simclr import build_model, sync_bn_groups, uses_channels_last
from trainer.observe.bottlenecks import Bottlenecks
from trainer.observe.profiling import StepProfiler
from trainer.observe.step_clock import StepClock
from trainer.run.step import ForwardBackward, build_forward_backward
from trainer.runtime.dataclass_yaml import ConfigError
from trainer.runtime.distributed import DistInfo
from trainer.runtime.run_files import RunFolderLock
from trainer.state.checkpoint import TrainState
from trainer.state.checkpointer import Checkpointer
from trainer.state.rng_state import seed_everything
from trainer.tracking import Tracker

log = get_logger()


@dataclass
class TrainParts:
    cfg: Config
    info: DistInfo
    loader: ViewLoader  # (view size groups, labels) on info.device, steps_per_epoch equal on every rank
    model: nn.Module  # the SimCLR model (encoder + projection head)
    ddp_model: nn.Module  # the model wrapped in DDP when distributed, else the model itself
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine  # lr for each step
    precision: PrecisionPolicy
    forward_backward: ForwardBackward  # plain or gradient-cached, chosen once (trainer.run.step)
    checkpointer: Checkpointer
    tracker: Tracker  # MLflow on rank 0; a no-op elsewhere
    train_state: TrainState  # step, world sizes, the tracker's state: the loop's own checkpoint state
    online_probe: OnlineProbe | None = None  # train.online_probe on labelled data
    val_source: Source | None = None  # data.val_root, opened once per run
    folder_lock: RunFolderLock | None = None  # rank 0's hold on the run folder, checked before its writes
    profiler: StepProfiler | None = None  # train.profile: torch.profiler over the steps asked for
    clock: StepClock | None = None  # where this rank's step time goes (marks in the step, read at log steps)
    bottlenecks: Bottlenecks | None = None  # rank 0: every rank's figures, stragglers, the verdict

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch


@dataclass
class ModelParts:
    """What the training step needs (``trainer.run.step.StepParts``): built by one function for the
    training run and the benchmarks alike."""

    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: PrecisionPolicy
    forward_backward: ForwardBackward
    loss_fn: LossFn  # the run's loss (loss.name), inside forward_backward; the benchmarks time it alone too
    clock: StepClock  # marks the loss and the optimizer step of the steps it is told of
    online_probe: OnlineProbe | None = None


def build_model_parts(cfg: Config, info: DistInfo, lr: float) -> ModelParts:
    """The model (SyncBatchNorm, DDP, torch.compile as configured), its optimizer at ``lr``, the
    precision policy and the forward-backward, on ``info.device``."""
    device = info.device
    if device.type == "cuda":  # NVIDIA's ResNet-50 settings: autotuned convolutions, TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg.model, device, info.world_size)
    ddp_model = model
    if info.distributed:
        # SyncBatchNorm over the whole world keeps every rank's running statistics equal: nothing to broadcast
        synced = cfg.model.sync_bn and len(sync_bn_groups(info.world_size, cfg.model.sync_bn_group_size)) == 1
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            gradient_as_bucket_view=True, **buffer_sync(not synced))
    if cfg.model.compile:
        ddp_model = torch.compile(ddp_model)
    precision = PrecisionPolicy(cfg.precision.dtype, device)
    channels_last = uses_channels_last(cfg.model, device)
    loss_fn, clock, optimizer = build_loss(cfg.loss), StepClock(device), build_optimizer(model, cfg.optim, lr)
    clock.watch_optimizer(optimizer)
    clock.watch_collectives(model)
    clock.watch_gradients(model)
    return ModelParts(model=model, ddp_model=ddp_model, optimizer=optimizer, precision=precision, loss_fn=loss_fn,
                      clock=clock, forward_backward=build_forward_backward(model, ddp_model, precision,
                                                                           clock.timing_loss(loss_fn),
                                                                           cfg.train.micro_batch, channels_last))


def buffer_sync(every_forward: bool) -> dict[str, bool]:
    """DDP's keyword for broadcasting buffers at each forward: ``forward_sync_buffers`` where torch
    has it (2.14; ``broadcast_buffers`` is deprecated there and warns on every rank), else
    ``broadcast_buffers`` (torch 2.11-2.13). Both still sync buffers once at construction, which is
    what we want: the ranks start equal."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": every_forward}
    return {"broadcast_buffers": every_forward}


def build_parts(cfg: Config, info: DistInfo) -> TrainParts:
    """The run's parts, in an order that keeps every random draw reproducible (seed, then loader,
    then model init)."""
    device = info.device
    per_rank, micro = cfg.data.batch_size // info.world_size, cfg.train.micro_batch
    if micro and per_rank % micro:
        valid = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        raise ConfigError(f"train.micro_batch={micro} does not divide this rank's share of the batch ({per_rank} = "
                          f"data.batch_size {cfg.data.batch_size} / {info.world_size} ranks); use one of {valid}")
    if device.type == "cpu" and cfg.precision.dtype == "fp16" and info.is_main:
        log.warning("precision.dtype=fp16 on the CPU runs about 20x slower than fp32 (no fast fp16 "
                 "kernels there); use precision.dtype=fp32 or bf16 on the CPU")
    seed_everything(cfg.train.seed, info.rank)
    index_folder = Path(cfg.train.run_dir)  # the listings of image trees and their files' checks
    loader = build_loader(cfg.data, cfg.train.seed, info.rank, info.world_size, device, index_folder)
    loader.check_files()  # a corrupt file is named now, before any MLflow run exists (a collective)
    val_source = (open_val_source(cfg.data, IndexStore(index_folder, info.rank, info.world_size))
                  if cfg.data.val_root else None)  # once per run, listed by rank 0
    if cfg.train.knn_every_epochs and val_source is not None:  # say now, not epochs later, that labels are missing
        why = "the kNN monitor (train.knn_every_epochs > 0; set it to 0 to pretrain without labels)"
        labelled_indices(loader.source, why)
        labelled_indices(val_source, why)
    schedule = build_schedule(cfg.optim, cfg.data.batch_size, loader.steps_per_epoch, cfg.train.epochs)
    m = build_model_parts(cfg, info, schedule(0))
    log.debug(f"model {cfg.model.arch}: {sum(p.numel() for p in m.model.parameters()):,} parameters, "
              f"{len(m.optimizer.param_groups)} optimizer groups; loader {loader.backend}, "
              f"{loader.steps_per_epoch} steps per epoch")
    labels = np.asarray(loader.source.labels)
    probe = None
    if cfg.train.online_probe and (labels >= 0).any():  # built after the model: its init draws come last
        probe = OnlineProbe(m.model.feature_dim, int(labels.max()) + 1, device)
    train_state = TrainState(loader.steps_per_epoch, info.world_size, data=data_fingerprint(loader.source))
    return TrainParts(
        cfg=cfg, info=info, loader=loader, model=m.model, ddp_model=m.ddp_model, optimizer=m.optimizer,
        schedule=schedule, precision=m.precision, forward_backward=m.forward_backward,
        checkpointer=Checkpointer(cfg, info, train_state, m.model, m.optimizer, m.precision,
                                  probe.checkpoint_part() if probe is not None else None),
        tracker=Tracker(cfg.tracking, cfg.train.run_dir, active=info.is_main),
        train_state=train_state, online_probe=probe, val_source=val_source,
        profiler=StepProfiler(cfg.train.profile, info.rank, device, Path(cfg.train.run_dir)), clock=m.clock,
        bottlenecks=Bottlenecks(cfg.train.run_dir, cfg.data, device.type, info.is_main, loader.source.stored),
    )
