"""Real photographs that install offline: the pictures scikit-image bundles, as seeded random crops (PIL images)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

# The bundled pictures that load without a download (others in skimage.data fetch theirs on first use).
BUNDLED = ("astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "coins", "moon", "page", "text", "clock",
           "grass", "gravel", "brick", "colorwheel", "hubble_deep_field", "immunohistochemistry", "retina", "logo")


@lru_cache(maxsize=1)
def photos() -> tuple[Image.Image, ...]:
    import skimage.data

    out = []
    for name in BUNDLED:
        array = np.asarray(getattr(skimage.data, name)())
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        array = array[..., :3]
        if array.dtype != np.uint8:  # boolean or float pictures: stretch to 0..255
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / (np.ptp(array) + 1e-9)).astype(np.uint8)
        out.append(Image.fromarray(array))
    return tuple(out)


def crops(per_photo: int, seed: int) -> list[Image.Image]:
    """`per_photo` random crops (40-100% of each side, half of them mirrored) of every bundled picture."""
    rng = np.random.default_rng(seed)
    result = []
    for image in photos():
        width, height = image.size
        for _ in range(per_photo):
            scale = rng.uniform(0.4, 1.0)
            w, h = int(width * scale), int(height * scale)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = image.crop((x, y, x + w, y + h))
            result.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return result
