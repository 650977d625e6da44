"""Seeds derived from a run's seed and a position (epoch, step, rank, sample): one home for the rule."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int, bits: int = 31) -> int:
    """A well-mixed ``bits``-bit seed from integer ``keys`` (NumPy's SeedSequence: distinct keys give
    independent streams, unlike arithmetic on the run's seed); the same keys give the same seed on
    every machine and Python version."""
    state = np.random.SeedSequence([int(k) % 2**32 for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) % 2**bits)
