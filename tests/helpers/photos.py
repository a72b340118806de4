"""Real photographs that install offline: the pictures scikit-image bundles, as seeded random crops (PIL images).

They are read as files from scikit-image's data folder (without importing scikit-image, whose loaders give the same
arrays), or from the folder EDGEKD_PHOTOS names: a machine without scikit-image (a lent device) can be handed a
copy of that folder.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# The bundled pictures that load without a download (others in skimage.data fetch theirs on first use), by the name
# of their skimage.data function, and their files.
FILES = {"astronaut": "astronaut.png", "camera": "camera.png", "cat": "chelsea.png", "chelsea": "chelsea.png",
         "coffee": "coffee.png", "rocket": "rocket.jpg", "coins": "coins.png", "moon": "moon.png", "page": "page.png",
         "text": "text.png", "clock": "clock_motion.png", "grass": "grass.png", "gravel": "gravel.png",
         "brick": "brick.png", "colorwheel": "color.png", "hubble_deep_field": "hubble_deep_field.jpg",
         "immunohistochemistry": "ihc.png", "retina": "retina.jpg", "logo": "logo.png"}
BUNDLED = tuple(FILES)


def photo_folder() -> Path:
    if folder := os.environ.get("EDGEKD_PHOTOS"):
        return Path(folder)
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no scikit-image here: install it, or set EDGEKD_PHOTOS to a copy of its data folder")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@lru_cache(maxsize=1)
def photos() -> tuple[Image.Image, ...]:
    folder = photo_folder()
    out = []
    for name in BUNDLED:
        array = np.asarray(Image.open(folder / FILES[name]))
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
