"""Real image files of the kinds users have, made from a real photograph, each with the picture a viewer shows.

Every file is written by Pillow's own encoders (JPEG with an EXIF block, PNG with alpha, 16-bit PNG, palette PNG,
CMYK JPEG, a JPEG cut short), so the readers under test decode real files, not arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.photos import photos

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class UserImage:
    path: Path
    shown: np.ndarray  # uint8 H x W x 3 (or H x W): what a photo viewer shows for the file
    tolerance: float  # mean absolute difference allowed against `shown` (0: lossless files)


def picture(width: int = 160, height: int = 112) -> Image.Image:
    """A real photograph (scikit-image's astronaut), landscape so that a wrong rotation changes its shape."""
    return photos()[0].resize((width, height), Image.Resampling.BILINEAR)


def write_user_images(folder: Path) -> dict[str, UserImage]:
    folder.mkdir(parents=True, exist_ok=True)
    upright = picture()
    rgb = np.asarray(upright)
    made: dict[str, UserImage] = {}

    # A phone photo: pixels stored sideways, EXIF orientation 6 ("rotate 90 clockwise to view").
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "phone.jpg", quality=95, exif=exif.tobytes())
    made["exif"] = UserImage(folder / "phone.jpg", rgb, 4.0)

    # A cut-out: the left third fully transparent over garish green, a band half transparent, the rest opaque.
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    third = rgb.shape[1] // 3
    rgba[:, :third, :3] = (0, 255, 0)
    rgba[:, :third, 3] = 0
    rgba[:, third:third + 10, 3] = 128
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    shown = rgb.copy()
    shown[:, :third] = 255
    band = rgb[:, third:third + 10].astype(np.float64)
    shown[:, third:third + 10] = np.floor((band * 128 + 255 * 127 + 127) / 255).astype(np.uint8)
    made["rgba"] = UserImage(folder / "cutout.png", shown, 0.0)

    # A scanner's or microscope's 16-bit grey PNG: 8-bit values v stored as v * 257.
    grey = np.asarray(upright.convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "scan16.png")
    made["grey16"] = UserImage(folder / "scan16.png", grey, 0.0)

    # A palette PNG (GIF-like), and one whose palette entry 0 is transparent.
    palette = upright.quantize(colors=64)
    palette.save(folder / "palette.png")
    made["palette"] = UserImage(folder / "palette.png", np.asarray(palette.convert("RGB")), 0.0)
    indices = np.asarray(palette).copy()
    transparent = indices == indices[0, 0]
    keyed = Image.fromarray(indices, "P")
    keyed.putpalette(palette.getpalette())
    keyed.save(folder / "palette_keyed.png", transparency=int(indices[0, 0]))
    shown = np.asarray(palette.convert("RGB")).copy()
    shown[transparent] = 255
    made["palette_transparent"] = UserImage(folder / "palette_keyed.png", shown, 0.0)

    # A print shop's CMYK JPEG.
    upright.convert("CMYK").save(folder / "print.jpg", quality=95)
    made["cmyk"] = UserImage(folder / "print.jpg", rgb, 4.0)
    return made


def write_truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut off half way, as an interrupted download or copy leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture().save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
