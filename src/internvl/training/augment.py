"""Random JPEG re-encoding of training tiles.

Spec: INTERNVL.md §15, §20 item 31.
Reference: `internvl_chat/internvl/train/dataset.py` `build_transform(is_train=True)`.

Applied per tile after tiling (thumbnail included) when a dataset has `data_augment: true`; each tile draws its own
quality from the 26 integers 75..100. Never applied to video frames or at evaluation (the dataset decides).
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

JPEG_QUALITY_MIN, JPEG_QUALITY_MAX = 75, 100  # inclusive (§15)


def draw_jpeg_quality(rng: np.random.Generator | random.Random) -> int:
    """One quality uniformly from 75..100 inclusive."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(JPEG_QUALITY_MIN, JPEG_QUALITY_MAX + 1))
    if isinstance(rng, random.Random):
        return rng.randint(JPEG_QUALITY_MIN, JPEG_QUALITY_MAX)
    raise ValueError(f"rng must be a numpy Generator or random.Random, got {type(rng).__name__}")


def jpeg_recompress(tile: Image.Image, rng: np.random.Generator | random.Random) -> Image.Image:
    """Encode `tile` as JPEG at a random quality in 75..100 (Pillow's other encoder defaults) and decode it to RGB."""
    if not isinstance(tile, Image.Image):
        raise ValueError(f"tile must be a PIL.Image.Image, got {type(tile).__name__}")
    buffer = io.BytesIO()
    tile.convert("RGB").save(buffer, format="JPEG", quality=draw_jpeg_quality(rng))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")
