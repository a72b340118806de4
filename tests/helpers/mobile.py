"""The mobile (.ort) form of a bundle's model against its ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def assert_mobile_form_agrees(ort_path: Path, onnx_path: Path, feeds: dict | list[dict]) -> None:
    """The .ort file computes what its ONNX file computes at the optimisation level it was saved with (basic: the
    int8 fusions are left to the device's runtime), and mostly the same top-1 as the ONNX file's default session,
    whose fused int8 kernels round differently: on a CPU with AMX (Sapphire Rapids) logits moved by up to 0.16 and
    3 of 64 answers of the tiny test student (6 epochs, many near-ties) flipped, against none on AVX-512 VNNI."""
    def run(path: Path, level: ort.GraphOptimizationLevel) -> np.ndarray:
        """The first output for each feed (a list: one run each, e.g. images of different sizes), stacked."""
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, feed)[0] for feed in (feeds if isinstance(feeds, list) else [feeds])])

    mobile = run(ort_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    np.testing.assert_allclose(mobile, run(onnx_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), atol=1e-5)
    default = run(onnx_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert (mobile.argmax(-1) == default.argmax(-1)).mean() >= 0.9
