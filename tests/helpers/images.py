"""Writing real images to disk in the layouts --data accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, images: np.ndarray, labels: np.ndarray | None, class_names: tuple[str, ...] = (),
                 suffix: str = ".png") -> None:
    """Real images to disk: class sub-folders when labels are given, loose files otherwise."""
    for index, image in enumerate(images):
        target = folder / class_names[labels[index]] if labels is not None else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"img_{index:04d}{suffix}")
