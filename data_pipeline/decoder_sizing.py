"""How large DALI's JPEG decoder (nvJPEG) buffers are, sized from the dataset's own images rather
than ImageNet's fixed figures (which cost ~1.7 GB of device and ~2.25 GB of pinned memory a
pipeline): read from a few image headers once, at start."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.sources import Source

# nvJPEG's per-thread buffers at most this large: NVIDIA's ResNet-50 example and solo-learn use these
# fixed figures for ImageNet, which cost ~1.7 GB of device and ~2.25 GB of pinned memory a pipeline
MAX_DEVICE_PADDING = 211025920
MAX_HOST_PADDING = 140544512
MIN_PADDING = 1 << 20
SIZING_SAMPLES = 64


@dataclass(frozen=True)
class DecoderSizing:
    """nvJPEG's buffers sized from the dataset's own images: the largest decoded image among
    ``SIZING_SAMPLES`` spread over the set, twice over (room for a larger one; a still larger
    image only costs a reallocation), between 1 MiB and the ImageNet figures. Per DALI thread:
    one device buffer of ``device_padding`` and two pinned host buffers of ``host_padding``."""

    max_width: int
    max_height: int
    device_padding: int
    host_padding: int

    def planned_mb(self, threads: int) -> dict[str, float]:
        return {"device": threads * self.device_padding / 2**20, "pinned": 2 * threads * self.host_padding / 2**20}


def decoder_sizing(source: Source) -> DecoderSizing | None:
    """The decoder's buffers for ``source``'s images, from the headers of a few (None for decoded
    arrays, which DALI does not decode). An unreadable header is skipped: the file check names it."""
    if source.stored == "decoded" or len(source) == 0:
        return None
    from io import BytesIO

    from PIL import Image

    width = height = 0
    for i in np.unique(np.linspace(0, len(source) - 1, SIZING_SAMPLES).astype(np.int64)):
        where = source.sample_name(int(i)) if source.stored == "files" else BytesIO(source.read_encoded(int(i)))
        try:
            with Image.open(where) as image:
                w, h = image.size
        except (OSError, ValueError):
            continue
        width, height = max(width, w), max(height, h)
    largest = 2 * width * height * 3
    pad = -(-max(MIN_PADDING, largest) // MIN_PADDING) * MIN_PADDING  # whole MiB
    return DecoderSizing(width, height, min(pad, MAX_DEVICE_PADDING), min(pad, MAX_HOST_PADDING))
