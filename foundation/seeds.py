"""Seeds derived from a run's seed and a position (epoch, step, rank, sample): the home for the rule.

The two loaders still derive their augmentation seeds with ``hash()`` of a tuple of ints (stable
across processes and Python versions for ints): moving them here changes every augmentation draw,
and ``tests/test_dali.py::test_parity_with_torchvision`` then failed. The cause is understood now:
the two backends' colour jitter differ by design, not by seed. Measured per operation on the same
images (mean absolute pixel difference, 0..1): brightness 0.002 and saturation 0.003 agree, but
DALI's contrast pivots on mid-grey where torchvision's pivots on each image's mean grey (0.02-0.035;
``fn.brightness_contrast(contrast_center=per-image mean)`` closes it to 0.003 on the CPU, untried on
a GPU, where a computed argument input may have to live on the CPU), and DALI rotates hue in YIQ
space where torchvision shifts it in HSV (0.05-0.09; DALI's ``fn.hsv`` is YIQ too). Over a whole
view that leaves the normalised blue channel's mean about 0.1 apart, close to the test's 0.12, so
the draws stay where they are until the jitter itself matches.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int, bits: int = 31) -> int:
    """A well-mixed ``bits``-bit seed from integer ``keys`` (NumPy's SeedSequence: distinct keys give
    independent streams, unlike arithmetic on the run's seed); the same keys give the same seed on
    every machine and Python version."""
    state = np.random.SeedSequence([int(k) % 2**32 for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) % 2**bits)


def augmentation_seed(*keys: int, bits: int) -> int:
    """The loaders' augmentation seeds (see the module note for why they are not ``derive_seed``
    yet): ``hash`` of a tuple of ints, which is the same in every process and run, cut to ``bits``."""
    return hash(tuple(int(k) for k in keys)) & (2**bits - 1)
