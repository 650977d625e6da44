"""Our SyncBatchNorm against BatchNorm2d in float64 on the same input, in a real 1-rank process
group (so the synchronised path runs, its all-reduces included): on the CPU (gloo) and on CUDA (NCCL)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from trainer.model.sync_batchnorm import convert_sync_batchnorm


@contextlib.contextmanager
def one_rank_process_group(backend: str) -> Iterator[None]:
    kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def syncbn_against_plain(x: torch.Tensor, affine: bool = True) -> dict[str, float]:
    """Max differences of output, input gradient (relative), parameter gradients (relative) and
    running variance, ours on ``x`` (its dtype and device) vs nn.BatchNorm2d in float64."""
    torch.manual_seed(1)
    plain = nn.BatchNorm2d(x.shape[1], affine=affine).double().to(x.device)
    if affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.normal_()
    sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(x.shape[1], affine=affine)))[0].to(x.device)
    sync.load_state_dict({k: v.float() for k, v in plain.state_dict().items()})
    dy = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    ref_x, our_x = x.double().clone().requires_grad_(), x.clone().requires_grad_()
    ref_out, our_out = plain(ref_x), sync(our_x)
    (ref_out * dy).sum().backward()
    (our_out * dy.to(x.dtype)).sum().backward()
    diffs = {"out": (our_out.double() - ref_out).abs().max().item(),
             "xgrad": (our_x.grad.double() - ref_x.grad).abs().max().item() / ref_x.grad.abs().max().item(),
             "running_var": (sync.running_var.double() - plain.running_var).abs().max().item()}
    if affine:
        diffs["wgrad"] = ((sync.weight.grad.double() - plain.weight.grad).abs().max() /
                          plain.weight.grad.abs().max()).item()
        diffs["bgrad"] = ((sync.bias.grad.double() - plain.bias.grad).abs().max() / plain.bias.grad.abs().max()).item()
    return diffs
