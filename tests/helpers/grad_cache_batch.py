"""The fixed global batch of the gradient-caching parity tests (the same in every process)."""

import torch


def global_views(batch: int, size: int, small_views: int = 0) -> list[torch.Tensor]:
    """Size groups: two views of ``size`` px, and ``small_views`` of half that (multi-crop)."""
    gen = torch.Generator().manual_seed(123)
    groups = [torch.randn(2, batch, 3, size, size, generator=gen)]
    if small_views:
        groups.append(torch.randn(small_views, batch, 3, size // 2, size // 2, generator=gen))
    return groups
