"""THE accuracy routine: top-1 / top-5 from predictions and labels. Training, the accuracy guard and bench all score
with it, so a model measured in two places gets the same figure."""

from __future__ import annotations

import numpy as np

TOP_K = 5


def top_predictions(logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Each row's `k` best classes (fewer when there are fewer classes), best first. Ties: the lower class first."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :min(k, logits.shape[1])]


def accuracy(top: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """(top-1, top-5) over the labeled rows (label >= 0) of `top` (N x k predictions, best first, or N top-1
    predictions); None, None when nothing is labeled. Top-5 is None for top-1-only predictions."""
    top = top[:, None] if top.ndim == 1 else top
    labeled = labels >= 0
    if not labeled.any():
        return None, None
    hits = top[labeled] == labels[labeled, None]
    top5 = float(hits.any(axis=1).mean()) if top.shape[1] > 1 else None
    return float(hits[:, 0].mean()), top5


def indistinguishable_from_chance(top1: float | None, classes: int, images: int) -> bool:
    """Whether a top-1 measured on `images` images lies within two standard errors of guessing among `classes`:
    such a model (a teacher fine-tuned on too few images or steps) has nothing to teach."""
    if top1 is None or classes < 2 or images < 1:
        return False
    chance = 1.0 / classes
    return top1 <= chance + 2.0 * (chance * (1.0 - chance) / images) ** 0.5


def paired_agreement(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Top-1 agreement of two models, each given as (image indices, top-1 classes), on the images both were scored
    on: evaluation leaves out an image it cannot decode, and a file that broke between the two passes would
    otherwise pair one model's answer for an image with the other's for the next."""
    _, in_first, in_second = np.intersect1d(first[0], second[0], assume_unique=True, return_indices=True)
    if not len(in_first):
        return None
    return float((np.asarray(first[1])[in_first] == np.asarray(second[1])[in_second]).mean())
