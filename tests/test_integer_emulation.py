"""Dynamic int8's integer products, measured as a CPU that does not saturate computes them (issue 11: kernel
saturation). Real ONNX Runtime sessions on real graphs; the exact products come from int64 arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgekd.deploy.integer_emulation import integer_products_in_float
from edgekd.deploy.verify import session
from edgekd.select.profiles import detect_isa

K, N = 1280, 10  # EfficientNet-B0's classifier: 1,280 products per answer


def saturating_matmul(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """MatMulInteger of a row of large uint8 activations by large int8 weights (pairs of products past int16), with
    zero points as dynamic quantization writes them: a scalar one for the activations, per column for the weights.
    Returns (activations, the exact int64 product)."""
    rng = np.random.default_rng(0)
    weights = rng.integers(100, 128, size=(K, N)).astype(np.int8)
    column_zero_points = rng.integers(-3, 4, size=N).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "a_zero", "w_zero"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, N])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array(3, np.uint8), "a_zero"),
         numpy_helper.from_array(column_zero_points, "w_zero")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    activations = np.stack([np.full(K, 255, np.uint8), rng.integers(200, 256, size=K).astype(np.uint8)])
    exact = (activations.astype(np.int64) - 3) @ (weights.astype(np.int64) - column_zero_points.astype(np.int64))
    return activations, exact


def test_integer_products_are_computed_exactly_in_float(tmp_path: Path) -> None:
    activations, exact = saturating_matmul(tmp_path / "matmul.onnx")
    emulated = session(tmp_path / "matmul.onnx", unfused=True).run(None, {"a": activations})[0]
    np.testing.assert_allclose(emulated, exact, rtol=1e-6)  # float32 rounding of sums past 2^24, nothing more
    # (this host's own kernels: on an AVX2 CPU without VNNI each pair of products stops at 32,767)
    own = session(tmp_path / "matmul.onnx").run(None, {"a": activations})[0]
    if detect_isa() == "avx2":
        assert (own < 0.7 * exact).all(), "expected VPMADDUBSW saturation on this AVX2 host"


@pytest.mark.parametrize("spatial", [(9, 9), (9,)])  # 2-D convs, and a 1-D one (its zero points reshape otherwise)
def test_integer_convolution_is_computed_exactly_in_float(tmp_path: Path, spatial: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(1, 8, *spatial)).astype(np.uint8)
    w = rng.integers(-128, 128, size=(4, 2, *(3 for _ in spatial))).astype(np.int8)  # 4 groups of 2 input channels
    w_zero = rng.integers(-5, 6, size=4).astype(np.int8)  # per output channel
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w", "x_zero", "w_zero"], ["y"], name="conv", group=4,
                          pads=[1] * 2 * len(spatial), strides=[2] * len(spatial))], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(7, np.uint8), "x_zero"),
         numpy_helper.from_array(w_zero, "w_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(integer_products_in_float(model), str(tmp_path / "conv.onnx"))
    emulated = session(tmp_path / "conv.onnx").run(None, {"x": x})[0]
    convolve = torch.nn.functional.conv2d if len(spatial) == 2 else torch.nn.functional.conv1d
    exact = convolve(torch.from_numpy(x.astype(np.float64) - 7),
                     torch.from_numpy(w.astype(np.float64) - w_zero.reshape(-1, *(1 for _ in w.shape[1:]))),
                     padding=1, stride=2, groups=4)
    assert emulated.dtype == np.int32 and emulated.shape == (1, 4, *(5 for _ in spatial))
    np.testing.assert_array_equal(emulated, exact.numpy().astype(np.int64))


def requantized_graph(op: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A QLinearConv / QLinearMatMul / QGemm as ORT's QOperator format writes them (uint8 activations with a zero
    point, int8 weights per output channel, int32 bias), with products past int16 in pairs and an output scale that
    keeps the exact answer inside uint8. Returns (activations, the exact answer: int64 sums, float64 requantization,
    rounded half to even)."""
    rng = np.random.default_rng(2)
    channels, k = 6, 256
    x_scale, x_zero, y_zero = 0.02, 3, 40
    w_scale = rng.uniform(0.01, 0.03, size=channels).astype(np.float32)
    bias = rng.integers(-5000, 5000, size=channels).astype(np.int32)
    if op == "QLinearConv":
        x = rng.integers(200, 256, size=(2, k, 3, 3)).astype(np.uint8)
        w = rng.integers(90, 128, size=(channels, k, 1, 1)).astype(np.int8)
        acc = np.einsum("nkhw,mk->nmhw", x.astype(np.int64) - x_zero, w[:, :, 0, 0].astype(np.int64))
        acc += bias.reshape(1, -1, 1, 1)
        per_channel = w_scale.reshape(1, -1, 1, 1)
    else:
        x = rng.integers(200, 256, size=(2, k)).astype(np.uint8)
        w = rng.integers(90, 128, size=(k, channels)).astype(np.int8)
        acc = (x.astype(np.int64) - x_zero) @ w.astype(np.int64)
        per_channel = w_scale
        if op == "QGemm":
            acc += bias
            w = np.ascontiguousarray(w.T)  # transB=1, as the quantizer writes a classifier
        else:
            w_scale = w_scale[:1]  # QLinearMatMul takes one scale per tensor here, as ORT writes them
            per_channel = w_scale
    y_scale = float(np.max(acc * x_scale * per_channel) / 200)  # the largest answer near 240: no clipping
    exact = np.clip(np.round(acc * (x_scale * per_channel.astype(np.float64) / y_scale)) + y_zero, 0, 255)
    constants = [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
                 numpy_helper.from_array(np.array(x_zero, np.uint8), "xz"), numpy_helper.from_array(w, "w"),
                 numpy_helper.from_array(w_scale if op != "QLinearMatMul" else w_scale[0], "ws"),
                 numpy_helper.from_array(np.zeros(len(w_scale), np.int8) if op != "QLinearMatMul" else
                                         np.array(0, np.int8), "wz"),
                 numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
                 numpy_helper.from_array(np.array(y_zero, np.uint8), "yz")]
    constants += [numpy_helper.from_array(bias, "b")] if op != "QLinearMatMul" else []
    if op == "QGemm":
        node = helper.make_node("QGemm", ["x", "xs", "xz", "w", "ws", "wz", "b", "ys", "yz"], ["y"], name="q",
                                domain="com.microsoft", transB=1, alpha=1.0)
    else:
        inputs = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"] + (["b"] if op == "QLinearConv" else [])
        node = helper.make_node(op, inputs, ["y"], name="q")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], constants)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return x, exact.astype(np.int64)


@pytest.mark.parametrize("op", ["QLinearConv", "QLinearMatMul", "QGemm"])
def test_qoperator_products_are_requantized_as_a_non_saturating_cpu_does(op: str, tmp_path: Path) -> None:
    """The static QOperator preset's files for another CPU are measured through the rewrite too."""
    x, exact = requantized_graph(op, tmp_path / "q.onnx")
    emulated = session(tmp_path / "q.onnx", unfused=True).run(None, {"x": x})[0]
    assert emulated.dtype == np.uint8 and emulated.shape == exact.shape
    difference = np.abs(emulated.astype(np.int64) - exact)
    assert difference.max() <= 1 and (difference == 0).mean() >= 0.95  # float32 products: a tie may round apart
    own = session(tmp_path / "q.onnx").run(None, {"x": x})[0]  # this host's own kernels
    if detect_isa() == "avx2":
        assert np.abs(own.astype(np.int64) - exact).max() > 20, "expected VPMADDUBSW saturation on this AVX2 host"


def test_qattention_is_computed_as_the_float_attention_it_quantizes(tmp_path: Path) -> None:
    """Dynamic int8 of an attention-fused ViT (attention_fusion.py) projects q, k and v with QAttention: emulated,
    that is the float Attention op on the dequantized input and weights, with full-range weights that saturate an
    AVX2 CPU's pairs of products."""
    rng = np.random.default_rng(2)
    tokens, hidden, heads = 5, 64, 2
    x = rng.integers(180, 256, size=(1, tokens, hidden)).astype(np.uint8)
    w = rng.integers(-128, 128, size=(hidden, 3 * hidden)).astype(np.int8)
    bias = rng.standard_normal(3 * hidden).astype(np.float32)
    x_scale, x_zero, w_scale = np.float32(0.02), np.uint8(7), (rng.random(3 * hidden) * 1e-3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QAttention", ["x", "w", "bias", "x_scale", "w_scale", "", "x_zero"], ["y"], name="qatt",
                          domain="com.microsoft", num_heads=heads)], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias"),
         numpy_helper.from_array(np.array(x_scale), "x_scale"), numpy_helper.from_array(w_scale, "w_scale"),
         numpy_helper.from_array(np.array(x_zero), "x_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "qattention.onnx"))
    rewritten = integer_products_in_float(model)
    assert {n.op_type for n in rewritten.graph.node} >= {"Attention"} and "QAttention" not in {
        n.op_type for n in rewritten.graph.node}
    emulated = session(tmp_path / "qattention.onnx", unfused=True).run(None, {"x": x})[0]
    qkv = ((x.astype(np.float64) - x_zero) * x_scale) @ (w.astype(np.float64) * w_scale) + bias
    q, k, v = (part.reshape(tokens, heads, -1).transpose(1, 0, 2) for part in np.split(qkv[0], 3, axis=-1))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hidden // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    exact = (weights @ v).transpose(1, 0, 2).reshape(1, tokens, hidden)
    np.testing.assert_allclose(emulated, exact, rtol=1e-4, atol=1e-4)
    if detect_isa() != "avx2":  # a CPU whose int8 unit does not saturate computes the same in its own kernels
        own = session(tmp_path / "qattention.onnx").run(None, {"x": x})[0]
        np.testing.assert_allclose(own, exact, rtol=1e-3, atol=1e-3)
