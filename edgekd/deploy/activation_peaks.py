"""Which calibration images stretch minmax ranges: those whose activations peak far beyond the other images'.

Some networks answer a few images with activations 100-1,000x everyone else's (an 8-epoch EfficientNet-B0 student:
5 of its 256 calibration images, all sandals, up to 1,143x; benchmarks/results/quantization_host.md, item 4). Minmax
ranges stretched to them leave the other images a level or two; averaged ranges (quantize.py, "average") clip them.
The guard says so in its log when minmax fails, so that a user sees why another calibration ships.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from edgekd.deploy.activation_ranges import RANGE_BATCH
from edgekd.deploy.verify import INPUT_NAME

EXTREME = 10.0  # an image whose peak |activation| at some conv's output is this many times the median image's there
_PEAK_PREFIX = "edgekd_image_peak_"


@dataclass(frozen=True)
class ExtremeImages:
    """The calibration images (row indices) whose peak at some conv's output is over EXTREME x the median image's
    there, and the largest such ratio over all images and convs, with the conv output where it is reached."""

    images: int
    extreme: tuple[int, ...]
    largest_x_median: float
    largest_at: str

    def describe(self) -> str:
        return (f"{len(self.extreme)} of {self.images} calibration images drive a conv's peak activation past "
                f"{EXTREME:.0f}x the median image's (up to {self.largest_x_median:.0f}x, at {self.largest_at})")


def extreme_images(path: Path, images: np.ndarray, batch_size: int = RANGE_BATCH) -> ExtremeImages:
    """Run the float model `path` over `images` with each Conv output's per-channel peak |value| exposed
    (Abs -> GlobalMaxPool: N x C values, not the maps themselves, so what is kept stays small at any input size; the
    run itself holds a batch's activations, hence a few images a batch)."""
    model = onnx.load(str(path))
    convs = [node.output[0] for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        return ExtremeImages(len(images), (), 1.0, "-")
    for index, name in enumerate(convs):
        magnitude, peak = f"{_PEAK_PREFIX}abs_{index}", f"{_PEAK_PREFIX}{index}"
        model.graph.node.extend([helper.make_node("Abs", [name], [magnitude]),
                                 helper.make_node("GlobalMaxPool", [magnitude], [peak])])
        model.graph.output.append(helper.make_tensor_value_info(peak, onnx.TensorProto.FLOAT, None))
    runner = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [f"{_PEAK_PREFIX}{index}" for index in range(len(convs))]
    peaks = np.concatenate([
        np.stack([channel_peaks.reshape(len(channel_peaks), -1).max(axis=1) for channel_peaks in runner.run(
            outputs, {INPUT_NAME: np.asarray(images[start:start + batch_size], dtype=np.float32)})], axis=1)
        for start in range(0, len(images), batch_size)])  # images x convs
    ratios = peaks / np.maximum(np.median(peaks, axis=0), 1e-12)
    image, conv = np.unravel_index(int(np.argmax(ratios)), ratios.shape)
    extreme = tuple(int(i) for i in np.flatnonzero((ratios > EXTREME).any(axis=1)))
    return ExtremeImages(len(images), extreme, float(ratios[image, conv]), convs[conv])
