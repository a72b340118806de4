"""Keep bias correction and learned rounding only where they bring the model's answers closer to fp32's.

Both fit each layer on the first CORRECTION_IMAGES calibration images (bias_correction.py), layer by layer, and a
layer that matches fp32 better on its own can still leave the model's answers further from fp32's. On the real
EfficientNet-Lite0 they take the mean KL divergence from fp32 from 0.055 to 0.0046; on a 2-epoch EfficientNet-B0
student (logits spread over +-80, a median top-2 margin of 1.7) both took agreement with fp32 from 86.5% to 70.8%
with percentile ranges (bias correction alone: 90.3%), and from 94.2% to 90.3% with entropy ranges
(benchmarks/results/weight_corrections.md). So each form is
judged where it counts, at the model's output, on calibration images it was not fitted on, and the file keeps the
form closest to fp32: with both, with bias correction alone (tried when both lose to neither), or with neither.
Judged in float on the dequantized values (what an int8 unit that does not saturate computes), as the corrections
themselves are fitted.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgekd.deploy.bias_correction import CORRECTION_IMAGES, BiasCorrection, correct_bias
from edgekd.deploy.verify import onnx_logits, session

log = logging.getLogger(__name__)

# Fewer held-out images than this and the forms are judged on the images they were fitted on (a calibration set of
# 32-71 images): a form that moves the answers away from fp32 there does so anywhere.
MIN_HELD_OUT = 8
METADATA_KEY = "edgekd.weight_corrections"  # in the ONNX file's metadata: which form it kept
BOTH, BIAS, NEITHER = "bias correction + learned rounding", "bias correction", "none"


@dataclass(frozen=True)
class CorrectionCheck:
    """Which corrections the file kept, and each tried form's mean KL divergence from fp32's answers on `images`
    images (`held_out`: images the corrections were not fitted on)."""

    kept: str
    divergence: dict[str, float] = field(default_factory=dict)
    images: int = 0
    held_out: bool = True
    correction: BiasCorrection | None = None  # what the kept correction did (None: the file kept neither)


def correct_where_it_helps(reference: Path, quantized: Path, images: np.ndarray, *, learn_rounding: bool,
                           judge: bool = True) -> CorrectionCheck:
    """Bias-correct `quantized` in place (with learned rounding if asked), then keep whichever of that, bias
    correction alone and neither puts the model's answers closest to `reference`'s on held-out images. Records the
    choice in the file's metadata (METADATA_KEY). `judge=False` keeps the corrections unjudged (benchmarks)."""
    if not judge:
        form = BOTH if learn_rounding else BIAS
        correction = correct_bias(reference, quantized, images, learn_rounding=learn_rounding)
        _record(quantized, form)
        return CorrectionCheck(form, images=0, held_out=False, correction=correction)
    held_out = images[CORRECTION_IMAGES:]
    judged_on = held_out if len(held_out) >= MIN_HELD_OUT else images[:CORRECTION_IMAGES]
    target = _log_probabilities(_logits(reference, judged_on))
    divergence = {NEITHER: _divergence(quantized, judged_on, target)}
    with tempfile.TemporaryDirectory(prefix="edgekd-corrections-") as scratch:
        uncorrected = Path(scratch) / "uncorrected.onnx"
        shutil.copyfile(quantized, uncorrected)
        corrections = {BOTH if learn_rounding else BIAS: correct_bias(reference, quantized, images,
                                                                      learn_rounding=learn_rounding)}
        first = next(iter(corrections))
        divergence[first] = _divergence(quantized, judged_on, target)
        files = {first: quantized, NEITHER: uncorrected}
        if learn_rounding and divergence[BOTH] >= divergence[NEITHER]:  # learned rounding may be what hurts
            files[BIAS] = Path(scratch) / "bias.onnx"
            shutil.copyfile(uncorrected, files[BIAS])
            corrections[BIAS] = correct_bias(reference, files[BIAS], images)
            divergence[BIAS] = _divergence(files[BIAS], judged_on, target)
        kept = min(divergence, key=lambda form: divergence[form])
        if kept != first:
            shutil.copyfile(files[kept], quantized)
    check = CorrectionCheck(kept, {k: round(v, 6) for k, v in divergence.items()}, len(judged_on),
                            judged_on is held_out, corrections.get(kept))
    _record(quantized, kept)
    log.info("weight corrections: kept %s (mean KL from fp32 %s, on %d %s images)", kept,
             ", ".join(f"{form} {value:.4g}" for form, value in divergence.items()), check.images,
             "held-out calibration" if check.held_out else "of the fitting")
    return check


def kept_corrections(path: Path) -> str | None:
    """The form of weight correction `path` kept (correct_where_it_helps), or None for a file it did not check."""
    for entry in onnx.load(str(path), load_external_data=False).metadata_props:
        if entry.key == METADATA_KEY:
            return entry.value
    return None


def _record(path: Path, kept: str) -> None:
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: kept})
    onnx.save(model, str(path))


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    """In float on the dequantized values (the graph unfused), in batches of 16, as the corrections are fitted."""
    return onnx_logits(session(path, unfused=True), images, batch_size=16).astype(np.float64)


def _log_probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _divergence(path: Path, images: np.ndarray, target: np.ndarray) -> float:
    """Mean KL(fp32 || quantized) of the answers: the finer measure than top-1 agreement on a few images."""
    ours = _log_probabilities(_logits(path, images))
    return float(np.mean(np.sum(np.exp(target) * (target - ours), axis=1)))
