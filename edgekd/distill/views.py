"""Mirrored fixed views: each training image as it is or flipped left to right, drawn per image and epoch.

Fixed views (the eval view of each image, every epoch) let the teacher answer each image once, from the disk cache,
and beat the random crop/flip in edgekd's benchmarks (edgekd/recipe.py). A mirror image adds a second view that is
as natural as the first without moving the object off the frame as a crop does, and it keeps the cache: there are
only two views per image, so the cache holds two rows per image (row 2i: image i, row 2i + 1: its mirror image).

The flip is applied to the batch after loading, to every model's tensor alike (the eval view's mirror image: the
mirror image's eval view up to a one-pixel shift where the center crop's margin is odd), so teacher and student see
the same view. Whether image i
is flipped in an epoch depends only on (seed, epoch, i): a resumed run flips as an uninterrupted one does, whatever
the worker count or the torchrun rank.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_STREAM = 0x666C6970  # keeps the flips' random stream apart from the other draws seeded by (seed, epoch)


class MirrorDraw:
    """Per epoch, which of `size` training images are shown flipped (about half, independently)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch: int | None = None
        self._flipped = torch.zeros(size, dtype=torch.bool)

    def flipped(self, indices: Tensor, epoch: int) -> Tensor:
        if epoch != self._epoch:  # one draw of `size` bits per epoch: 1 byte per training image
            self._flipped = torch.from_numpy(np.random.default_rng([self.seed, epoch, _STREAM]).random(self.size) < 0.5)
            self._epoch = epoch
        return self._flipped[indices.cpu()]


def mirror(inputs: tuple[Tensor, ...], flipped: Tensor) -> tuple[Tensor, ...]:
    """Each (B, C, H, W) tensor with the samples marked in `flipped` (B,) mirrored left to right."""
    return tuple(torch.where(flipped.to(x.device)[:, None, None, None], x.flip(-1), x) for x in inputs)


def view_rows(indices: Tensor, flipped: Tensor) -> Tensor:
    """The teacher cache's row of each sample's view: 2i for image i as it is, 2i + 1 for its mirror image."""
    return indices * 2 + flipped.to(indices.device, indices.dtype)
