"""Make ONNX Runtime keep in float, when it loads a static int8 file, the weights the quantizer left in float.

ONNX Runtime's session optimizer (its WeightBiasQuantization pass, which runs from the basic optimization level up, on
every execution provider and build) quantizes the float weights of a Conv, ConvTranspose or Gemm whose input comes
from a per-tensor DequantizeLinear: per tensor, symmetric int8. So a node `quantize_static(nodes_to_exclude=...)`
left in float, fed by a quantized node, runs in int8 anyway wherever the file is loaded, and per tensor, which a
depthwise conv with batch norm folded in cannot take: on the real Lite0, on an AVX2 host, "the first depthwise conv in
float" agreed with fp32 on 54.6% of the photo crops as ONNX Runtime ran it, 91.4% with the rewrite below (every conv
in int8: 92.1%; benchmarks/results/int8_rounding.md). A graph run without optimisation (the accuracy guard's
measurement for another CPU, then) never saw it. The pass matches only a DequantizeLinear with one scale; one with
the same scale once per channel (per-axis, axis 1) computes the same values and is left alone, so each node with
float weights fed by a per-tensor DequantizeLinear gets such a dequantization of its own: excluded by name, or of an
op type the preset does not quantize (a node the quantizer quantized reads its weights through a DequantizeLinear).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# The op types ONNX Runtime's WeightBiasQuantization quantizes.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm")


def input_channels(node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    """Length of axis 1 of `node`'s input 0 (its channels, or a Gemm's K), from its weight; None where axis 1 is not
    that (a Gemm with transA)."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return int(weight.shape[1]) * int(attributes.get("group", 1))
    if node.op_type == "ConvTranspose":
        return int(weight.shape[0])
    if attributes.get("transA", 0):
        return None
    return int(weight.shape[1] if attributes.get("transB", 0) else weight.shape[0])


def keep_float_weights(path: Path) -> int:
    """Rewrite the static int8 file `path` in place so that ONNX Runtime quantizes none of the weights the quantizer
    left in float when it loads the file (see the module's docstring). Returns how many nodes needed it."""
    model = onnx.load(str(path))
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    initializers = {init.name: init for init in graph.initializer}
    names = {name for node in graph.node for name in (node.name, *node.output)} | set(initializers)
    rewritten = 0
    for node in [n for n in graph.node if n.op_type in WEIGHTED_OPS]:
        dequantize = producer.get(node.input[0])
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or weight is None \
                or weight.data_type != onnx.TensorProto.FLOAT:
            continue  # not what the pass matches: a float producer, or weights already quantized (or computed)
        scale = initializers.get(dequantize.input[1])
        zero_point = initializers.get(dequantize.input[2]) if len(dequantize.input) > 2 else None
        channels = input_channels(node, numpy_helper.to_array(weight))
        if scale is None or int(np.prod(scale.dims)) != 1 or channels is None:
            continue  # already per-axis (not matched), or a layout whose channel axis is not 1
        stem = f"{node.name}_input_dequantized_per_axis"
        while stem in names:
            stem += "_"
        new_inputs = [dequantize.input[0], f"{stem}_scale"]
        graph.initializer.append(numpy_helper.from_array(
            np.full(channels, numpy_helper.to_array(scale).reshape(()), dtype=np.float32), f"{stem}_scale"))
        if zero_point is not None:
            point = numpy_helper.to_array(zero_point).reshape(())
            graph.initializer.append(numpy_helper.from_array(np.full(channels, point, dtype=point.dtype),
                                                             f"{stem}_zero_point"))
            new_inputs.append(f"{stem}_zero_point")
        per_axis = onnx.helper.make_node("DequantizeLinear", new_inputs, [stem], name=stem, axis=1)
        graph.node.insert(list(graph.node).index(node), per_axis)
        node.input[0] = stem
        names |= {stem, f"{stem}_scale", f"{stem}_zero_point"}
        rewritten += 1
    if rewritten:
        _drop_unread(graph)
        onnx.save(model, str(path))
    return rewritten


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove DequantizeLinear nodes nobody reads any more (a float node's old input), and those of their parameters
    nothing else reads; the rest of the graph is left as it is."""
    outputs = {o.name for o in graph.output}
    read = {name for node in graph.node for name in node.input} | outputs
    unread = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in read]
    for node in unread:
        graph.node.remove(node)
    still_read = {name for node in graph.node for name in node.input} | outputs
    parameters = {name for node in unread for name in node.input[1:]} - still_read
    for init in [init for init in graph.initializer if init.name in parameters]:
        graph.initializer.remove(init)
