"""Activation ranges and histograms for static int8 calibration, computed a few images at a time.

onnxruntime's calibrators hold more of the calibration set's activations than a laptop has room for. Its histogram
calibrators (percentile, entropy) keep every image's activations until the last image has run and only then bin them:
EfficientNet-B0 at 224 px on edgekd's 256 calibration images was killed at 23.3 GB resident, the machine's memory
(percentile ranges). Its MinMax calibrator reduces each tensor as it goes, but the session still holds a whole
batch's activations: averaged ranges, whose batches of 16 are what they average over, peaked at 3.7 GB there
(benchmarks/results/quantization_memory.md).
Strided collection (`CalibStridedMinMax`) bounds the histograms' memory but not their size: a later batch whose
values reach past the first batch's range grows the histogram by bins of the first batch's width (a tensor whose rare
images peak 1,000x higher, like the 8-epoch B0 of quantization_host.md, would get about a million bins), and the
ranges differ from the one-shot ones.

Here the calibrator's own augmented graph, which exposes each tensor it calibrates whole, runs a few images at a time
(RANGE_BATCH, fewer where they would return more than ACTIVATION_BUDGET), and the results are what onnxruntime
computes in one shot: each histogram over the extremes of every image (one pass for the extremes, one to bin), each
averaged range the mean of the extremes of each group of images. Memory holds one run's activations and the
histograms. The quantizer reads them as its calibration cache.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Collection, Iterator, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, create_calibrator
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

RANGE_BATCH = 4  # images per run at most: one run's activations are what the collection holds at a time
ACTIVATION_BUDGET = 1 << 30  # bytes of exposed activations a run may return; bigger graphs run fewer images


def images_per_run(model: onnx.ModelProto, outputs: Collection[str], most: int = RANGE_BATCH,
                   budget: int = ACTIVATION_BUDGET) -> int:
    """How many images a run of `model` returning `outputs` may take: as many as keep the outputs (float32, their
    sizes from shape inference) within `budget`, at most `most`, at least 1."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    uncounted, per_image = set(outputs), 0
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.name in uncounted and len(dims) > 1 and all(d.dim_value > 0 for d in dims[1:]):
            per_image += 4 * prod(d.dim_value for d in dims[1:])
            uncounted.discard(value.name)  # counted once, however often shape inference lists it
    return max(1, min(most, budget // max(per_image, 1)))


class CalibratedTensors:
    """The tensors onnxruntime calibrates for `source` (quantizing `op_types`), a few images at a time."""

    def __init__(self, source: Path, op_types: Sequence[str] | None, scratch: Path):
        # no op types means every op type the quantizer knows, as quantize_static reads it (with None the calibrator
        # would take every float tensor of every node)
        op_types = list(op_types or sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))
        # a histogram calibrator's augmented graph outputs each tensor to calibrate as it is (MinMax's reduces them)
        calibrator = create_calibrator(source, op_types, augmented_model_path=str(scratch / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile)
        self.session = calibrator.infer_session
        self.names = [output.name for output in self.session.get_outputs()
                      if output.name in calibrator.tensors_to_calibrate]
        self.feed = self.session.get_inputs()[0].name
        # a power of 2, so that it divides a group of averaged ranges
        fits = images_per_run(onnx.load(str(source)), self.names)
        self.batch_size = 1 << (fits.bit_length() - 1)

    def batches(self, images: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(images), self.batch_size):
            batch = np.asarray(images[start:start + self.batch_size], dtype=np.float32)
            values = self.session.run(self.names, {self.feed: batch})
            yield {name: value for name, value in zip(self.names, values) if value.size}


def averaged_ranges(tensors: CalibratedTensors, images: np.ndarray,
                    group: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(low, high) of each tensor: the mean over groups of `group` images (the last may be short) of each group's
    extremes, as onnxruntime's MinMax calibrator with CalibMovingAverage computes them from batches of `group`."""
    if group % tensors.batch_size:
        raise ValueError(f"a group of {group} images is not a whole number of batches of {tensors.batch_size}")
    lows: dict[str, list[np.ndarray]] = {}
    highs: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), group):
        low: dict[str, np.ndarray] = {}
        high: dict[str, np.ndarray] = {}
        for values in tensors.batches(images[start:start + group]):
            for name, value in values.items():
                low[name] = np.minimum(low[name], value.min()) if name in low else value.min()
                high[name] = np.maximum(high[name], value.max()) if name in high else value.max()
        for name in low:
            lows.setdefault(name, []).append(low[name])
            highs.setdefault(name, []).append(high[name])
    return {name: (np.nanmean(lows[name], axis=0), np.nanmean(highs[name], axis=0)) for name in lows}


def activation_histograms(tensors: CalibratedTensors, images: np.ndarray, method: CalibrationMethod,
                          num_bins: int) -> dict[str, tuple]:
    """Each tensor's histogram over every image in `images`, in the form onnxruntime's HistogramCollector keeps it
    for `method`:

    - Percentile (symmetric, as quantize_static calibrates it): (counts of |x|, edges from min |x| to max |x|,
      min x, max x);
    - Entropy: (counts of x, edges from -t to t, min x, max x, t), t = max |x|.
    """
    if method not in (CalibrationMethod.Percentile, CalibrationMethod.Entropy):
        raise ValueError(f"no histograms for {method}")
    percentile = method == CalibrationMethod.Percentile
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    smallest_magnitude: dict[str, np.ndarray] = {}
    for values in tensors.batches(images):
        for name, value in values.items():
            low[name] = min(low.get(name, np.inf), np.nanmin(value))
            high[name] = max(high.get(name, -np.inf), np.nanmax(value))
            if percentile:
                smallest_magnitude[name] = min(smallest_magnitude.get(name, np.inf), np.nanmin(np.abs(value)))
    # onnxruntime bins between these ends in the tensor's own dtype (float32); so does this
    largest_magnitude = {name: max(abs(low[name]), abs(high[name])) for name in low}
    ends = {name: (smallest_magnitude[name], largest_magnitude[name]) if percentile
            else (-largest_magnitude[name], largest_magnitude[name]) for name in low}
    wide = {name for name, (start, stop) in ends.items() if not _binnable(start, stop, num_bins)}
    counts = {name: np.zeros(num_bins, dtype=np.int64) for name in low}
    edges: dict[str, np.ndarray] = {}
    for values in tensors.batches(images):
        for name, value in values.items():
            data, span = (np.abs(value) if percentile else value), ends[name]
            if name in wide:  # too narrow a range for float32 bins (a near-constant tensor): bin it in float64
                data, span = data.astype(np.float64), tuple(float(end) for end in span)
            added, edges[name] = np.histogram(data, bins=num_bins, range=span)
            counts[name] += added
    edges = {name: bins.astype(low[name].dtype) for name, bins in edges.items()}  # float32, also where binned wide
    if percentile:
        return {name: (counts[name], edges[name], low[name], high[name]) for name in low}
    return {name: (counts[name], edges[name], low[name], high[name],
                   np.asarray(largest_magnitude[name], dtype=low[name].dtype)) for name in low}


def _binnable(start: np.ndarray, stop: np.ndarray, num_bins: int) -> bool:
    """Whether numpy can cut [start, stop] into `num_bins` distinct float32 bins (onnxruntime's one-shot collection
    fails with "Too many bins for data range" where it cannot)."""
    try:
        np.histogram(np.zeros(0, dtype=np.float32), bins=num_bins, range=(start, stop))
    except ValueError:
        return False
    return True
