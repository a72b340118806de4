"""onnxruntime's entropy (KL) threshold search, the same arithmetic without its per-bin Python loops.

`HistogramCollector.get_entropy_threshold` (TensorRT's method: for each candidate window, fold the outliers into
its end bins, merge it into the quantized levels, expand back and take the KL divergence) sums every merged bin
with Python's `sum` over numpy slices: 0.2 s per tensor at edgekd's 512 bins, 2.2 s at TensorRT's 2048, so
entropy calibration of an EfficientNet-B0 took minutes in the threshold search alone. Here each candidate's merge
and expansion are single numpy reductions; the smoothing and the divergence are onnxruntime's own functions on the
same arrays, so the chosen window is the one onnxruntime would choose (tests/test_quantize.py compares them).
"""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization.calibrate import entropy
from onnxruntime.quantization.quant_utils import smooth_distribution


def entropy_threshold(histogram: tuple, num_quantized_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The window (low, high) with the least KL divergence, as `get_entropy_threshold` returns it for the
    collector's (hist, edges, min seen, max seen) of one tensor."""
    hist, edges, min_value, max_value = histogram[:4]
    num_bins = hist.size
    zero_bin = num_bins // 2
    half = num_quantized_bins // 2
    dtype = edges.dtype
    before = np.concatenate(([0], np.cumsum(hist)))  # before[k] = hist[:k].sum(), exact in int64
    total = before[-1]
    windows, divergences = [], []
    for i in range(half, zero_bin + 1):
        start, end = zero_bin - i, min(zero_bin + i + 1, num_bins)
        windows.append((edges[start], edges[end]))
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += before[start]
        p[-1] += total - before[end]
        nonzeros = (p != 0).astype(np.int64)
        merged = sliced.size // num_quantized_bins
        covered = num_quantized_bins * merged
        quantized = sliced[:covered].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[covered:].sum()
        norms = nonzeros[:covered].reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        # onnxruntime writes quantized / norm into an int64 array: the quotient is truncated, and bins past the
        # last whole merge stay 0
        level = np.where(norms != 0, quantized / np.maximum(norms, 1), 0)
        q[:covered] = np.repeat(level.astype(np.int64), merged)
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergences.append(np.array(np.inf if p is None or q is None else entropy(p, q), dtype=dtype))
    low, high = windows[int(np.argmin(divergences))]
    if low < min_value:
        low = min_value
    if high > max_value:
        high = max_value
    return low, high
