"""The mobile (.ort) form of a bundle's model against its ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def assert_mobile_form_agrees(ort_path: Path, onnx_path: Path, feeds: dict) -> None:
    """The .ort file computes what its ONNX file computes at the optimisation level it was saved with (basic: the
    int8 fusions are left to the device's runtime), and gives the same top-1 as the ONNX file's default session,
    whose fused int8 kernels round a little differently."""
    def run(path: Path, level: ort.GraphOptimizationLevel) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    mobile = run(ort_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    np.testing.assert_allclose(mobile, run(onnx_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), atol=1e-5)
    default = run(onnx_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert (mobile.argmax(-1) == default.argmax(-1)).mean() >= 0.95
