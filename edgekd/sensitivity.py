"""Which nodes quantization hurts most: the accuracy guard keeps those in float and quantizes again.

Both models run with every candidate node's output exposed as a graph output and ORT graph optimisation off, so
the quantized model computes the float ops on dequantized values exactly as quantize_static wrote them. A node's
score is the quantization noise it adds itself: the normalised error of its output minus the worst error already
present on its inputs (error flowing in from upstream is not its fault).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgekd.verify import INPUT_NAME

_EPS = 1e-12


@dataclass(frozen=True)
class NodeSensitivity:
    """One node and the relative squared error it adds to its output (0 = lossless)."""

    name: str
    op_type: str
    added_error: float


def rank_sensitive_nodes(fp32_path: Path, quant_path: Path, images: np.ndarray,
                         skip: tuple[str, ...] = ()) -> list[NodeSensitivity]:
    """Nodes of the fp32 model (the one given to the quantizer) sorted by the error they add, worst first."""
    fp32 = onnx.load(str(fp32_path))
    quantized = onnx.load(str(quant_path))
    pairs = _matching_tensors(fp32, quantized, skip)
    reference = _intermediates(fp32, sorted({f for _, outs, ins in pairs for f, _ in (outs, *ins)}), images)
    actual = _intermediates(quantized, sorted({q for _, outs, ins in pairs for _, q in (outs, *ins)}), images)

    def error(pair: tuple[str, str]) -> float | None:
        f, q = pair
        if f not in reference or q not in actual or reference[f].shape != actual[q].shape:
            return None
        return _relative_error(reference[f], actual[q])

    ranked = []
    for node, output, inputs in pairs:
        out_error = error(output)
        if out_error is not None:
            upstream = max((e for e in map(error, inputs) if e is not None), default=0.0)
            ranked.append(NodeSensitivity(node.name, node.op_type, max(0.0, out_error - upstream)))
    return sorted(ranked, key=lambda s: s.added_error, reverse=True)


_Pair = tuple[str, str]  # (tensor in the fp32 model, the same quantity in the quantized model)


def _matching_tensors(fp32: onnx.ModelProto, quantized: onnx.ModelProto,
                      skip: tuple[str, ...]) -> list[tuple[onnx.NodeProto, _Pair, list[_Pair]]]:
    """Each fp32 node with its output and activation inputs paired to the quantized model's tensors.

    A node the quantizer kept (same name and op) is compared input by input, so a QDQ input is read after its
    DequantizeLinear; a node it replaced (dynamic MatMul -> MatMulInteger...) is compared by tensor names. A node
    it folded away (Relu after Conv/Add: the QuantizeLinear clips instead) has no float output of its own: skipped.
    """
    floats = _float_tensors(fp32)
    weights = {init.name for init in fp32.graph.initializer}
    kept = {n.name: n for n in quantized.graph.node}
    fp32_names = {n.name for n in fp32.graph.node}
    producer = {out: n.name for n in quantized.graph.node for out in n.output}
    pairs = []
    for node in fp32.graph.node:
        if not node.name or node.name in skip or not node.output or node.output[0] not in floats:
            continue
        twin = kept.get(node.name)
        if twin is not None and twin.op_type == node.op_type:
            inputs = [(f, q) for f, q in zip(node.input, twin.input) if f in floats and f not in weights]
            pairs.append((node, (node.output[0], twin.output[0]), inputs))
        elif twin is None and producer.get(node.output[0], node.name) not in fp32_names:
            inputs = [(f, f) for f in node.input if f in floats and f not in weights]
            pairs.append((node, (node.output[0], node.output[0]), inputs))
    return pairs


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {v.name for v in (*inferred.value_info, *inferred.output, *inferred.input)
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def _intermediates(model: onnx.ModelProto, names: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Run `model` on `images` returning the float tensors `names` (those it has)."""
    graph = model.graph
    existing = {o.name for o in graph.output}
    produced = {out for node in graph.node for out in node.output}
    for name in names:
        if name in produced and name not in existing:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    values = session.run(wanted, {INPUT_NAME: images.astype(np.float32)})
    return {name: value for name, value in zip(wanted, values) if value.dtype == np.float32}


def _relative_error(reference: np.ndarray, actual: np.ndarray) -> float:
    return float(np.mean((reference - actual) ** 2) / (np.mean(reference ** 2) + _EPS))
