"""Which samples a rank reads in an epoch: seeded orders, disjoint across ranks, the same count on
every rank (the gathered loss needs equal batches)."""

from __future__ import annotations

import numpy as np


def rank_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """This rank's sample indices for ``epoch``: one seeded global permutation, cut to a multiple
    of the world size so every rank gets the same count, then strided across ranks (disjoint,
    together covering all but at most world_size-1 samples). Global batch k is the same set of
    samples whatever the world size."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]


def block_rank_indices(bounds: np.ndarray, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Blocks of consecutive samples (block k is ``range(bounds[k], bounds[k + 1])``: a tar shard)
    in a seeded order, each block's samples in a seeded order, and rank r reads the r-th contiguous
    part: a rank opens about 1/world of the blocks and reads each front to back. Unlike
    ``rank_indices``, a global batch depends on the world size."""
    rng = np.random.default_rng([seed, epoch])
    order = np.concatenate([bounds[k] + rng.permutation(bounds[k + 1] - bounds[k])
                            for k in rng.permutation(len(bounds) - 1)])
    per_rank = len(order) // world_size
    return order[rank * per_rank : (rank + 1) * per_rank]
