"""Consistent teaching: one mixed view per sample, given to the teachers and the student alike.

"Patient and consistent" distillation (Beyer et al., CVPR 2022) feeds the teacher exactly the image the student
sees, mixup or cutmix included, so the KD target is the teacher's answer on that very view rather than a blend of
labels. The batch is mixed after the loaders' shared crop and flip, with one mixing ratio and one partner per
sample for every model's tensor:
- mixup is a per-pixel weighted mean, so it commutes with each model's resize and per-channel normalisation: the
  teacher's mixed tensor is its own preprocessing of the student's mixed image;
- cutmix pastes a box given as a fraction of the image, so models at different input sizes paste the same region.

The partner of sample i is sample B-1-i (the batch reversed, as timm's Mixup pairs them); the loader's shuffle
makes the pairs random. Ratios come from a generator seeded by (seed, step), so a resumed run mixes as an
uninterrupted one does. timm's Mixup mixes one tensor with numpy's global random state and returns blended label
vectors; here several tensors must share one draw and the losses need the partner's label (-1 when unlabeled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from edgekd.errors import EdgekdError
from edgekd.recipe import MIX_MODES


@dataclass(frozen=True)
class MixedBatch:
    """The mixed inputs (one per model, in the batch's order) and what the label losses need to follow them."""

    inputs: tuple[Tensor, ...]
    partner_labels: Tensor  # (B,) the label of each sample's partner, -1 where the partner has none
    own_share: Tensor  # (B,) the fraction of each mixed image that is the sample's own image


def check_mix(mode: str | None, alpha: float, extra: float | None = None) -> None:
    """`mode` and `extra` None: the recipe's (edgekd.recipe)."""
    if mode is not None and mode not in MIX_MODES:
        raise EdgekdError(f"unknown --mix {mode!r}; use one of {', '.join(MIX_MODES)}")
    if mode != "none" and alpha <= 0:
        raise EdgekdError(f"--mix-alpha must be positive (got {alpha}); 1.0 draws the mixing ratio uniformly")
    if extra is not None and extra < 0:
        raise EdgekdError(f"--mix-extra must be 0 or more (got {extra:g}); 0.5 adds one mixed image per two")
    if mode == "none" and extra:
        raise EdgekdError("--mix-extra adds mixed images, and --mix is none; give --mix mixup (or cutmix)")


def mix_batch(inputs: tuple[Tensor, ...], labels: Tensor, mode: str, alpha: float, seed: int, step: int) -> MixedBatch:
    """Mix every tensor in `inputs` (each (B, C, H, W), any H and W) with one draw for step `step`."""
    rng = np.random.default_rng([seed, step])
    use_cutmix = mode == "cutmix" or (mode == "mixup+cutmix" and rng.random() < 0.5)
    ratio = float(rng.beta(alpha, alpha))
    if use_cutmix:
        # snapped to the coarsest input's pixel grid, so inputs at multiples of its size paste the very same region
        height, width = min(x.shape[-2] for x in inputs), min(x.shape[-1] for x in inputs)
        box = _snap(_cutmix_box(ratio, rng), height, width)
        mixed = tuple(_paste(x, box) for x in inputs)
        ratio = 1.0 - _pasted_fraction(inputs[0], box)  # of the student's pixels, after clipping and rounding
    else:
        mixed = tuple(x * ratio + x.flip(0) * (1.0 - ratio) for x in inputs)
    return MixedBatch(mixed, labels.flip(0), torch.full((len(labels),), ratio, device=labels.device))


def _cutmix_box(ratio: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A box covering about 1 - ratio of the image, centred uniformly, clipped: (top, bottom, left, right) in [0, 1]."""
    side = float(np.sqrt(1.0 - ratio))
    cy, cx = rng.random(), rng.random()
    return (max(0.0, cy - side / 2), min(1.0, cy + side / 2), max(0.0, cx - side / 2), min(1.0, cx + side / 2))


def _snap(box: tuple[float, float, float, float], height: int, width: int) -> tuple[float, float, float, float]:
    top, bottom, left, right = _pixel_box(box, height, width)
    return top / height, bottom / height, left / width, right / width


def _pixel_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    return round(box[0] * height), round(box[1] * height), round(box[2] * width), round(box[3] * width)


def _pasted_fraction(x: Tensor, box: tuple[float, float, float, float]) -> float:
    top, bottom, left, right = _pixel_box(box, *x.shape[-2:])
    return (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])


def _paste(x: Tensor, box: tuple[float, float, float, float]) -> Tensor:
    top, bottom, left, right = _pixel_box(box, *x.shape[-2:])
    out = x.clone()
    out[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
    return out
