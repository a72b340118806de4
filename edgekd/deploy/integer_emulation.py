"""Dynamic int8's integer products computed in float, as a CPU whose int8 unit does not saturate computes them.

ONNX Runtime's MatMulInteger / ConvInteger (what dynamic quantization writes) multiply uint8 activations by int8
weights. Without VNNI, x86 does it with VPMADDUBSW, which sums each pair of products into int16 and saturates: on
the AVX2 host of these benchmarks a row of 255s times weights of 100-127 came out as 32,767 per pair (20,970,880
for 1,280 products where the exact sum is 36,606,925). VNNI and arm64's dot products add into int32 without that
loss, so a file made for them (no reduce_range) measured in an AVX2 CPU's kernels is judged worse than it runs
there: the 2-epoch EfficientNet-B0 student's dynamic int8 lost 4.96 points on the AVX2 host against 0.06 on an AMX
one. Rewritten here, each integer product is the same integers, zero points subtracted, multiplied in float32 and
cast back to int32: exact up to float32's rounding of sums above 2^24 (a relative error near 1e-7, far below the
int8 rounding itself). QDQ static files need no rewrite: run without graph optimisation they already compute in
float (verify.session).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

INTEGER_PRODUCT_OPS = frozenset({"MatMulInteger", "ConvInteger"})


def integer_products_in_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every MatMulInteger / ConvInteger replaced by the same product in float32."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in INTEGER_PRODUCT_OPS:
            nodes.append(node)
            continue
        prefix = f"{node.name or node.output[0]}/in_float"
        inputs = list(node.input) + [""] * (4 - len(node.input))
        conv = node.op_type == "ConvInteger"
        # a per-row zero point of A ([M]) meets A's rows as [M, 1]; a per-output-channel zero point of a conv's
        # weights ([M]) meets them as [M, 1, 1, 1] (2-D; one 1 per further axis); B's per-column zero point ([N])
        # broadcasts as it is
        a_shape = None if conv else [-1, 1]
        b_shape = [-1] + [1] * (ranks.get(inputs[1], 4) - 1) if conv else None
        a, a_nodes = _centred(inputs[0], inputs[2], f"{prefix}/a", a_shape)
        b, b_nodes = _centred(inputs[1], inputs[3], f"{prefix}/b", b_shape)
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        product = helper.make_node("Conv" if conv else "MatMul", [a, b], [f"{prefix}/product"], name=f"{prefix}/op",
                                   **attributes)
        cast = helper.make_node("Cast", [product.output[0]], [node.output[0]], name=f"{prefix}/int32",
                                to=TensorProto.INT32)
        nodes += [*a_nodes, *b_nodes, product, cast]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _centred(value: str, zero_point: str, prefix: str, zero_point_shape: list[int] | None
             ) -> tuple[str, list[onnx.NodeProto]]:
    """`value` - `zero_point` in float32 (the zero point reshaped to `zero_point_shape` first, when given)."""
    cast = helper.make_node("Cast", [value], [f"{prefix}/float"], name=f"{prefix}/float", to=TensorProto.FLOAT)
    if not zero_point:
        return cast.output[0], [cast]
    nodes = [cast, helper.make_node("Cast", [zero_point], [f"{prefix}/zero_point"], name=f"{prefix}/zero_point",
                                    to=TensorProto.FLOAT)]
    point = nodes[-1].output[0]
    if zero_point_shape is not None:
        shape = helper.make_node("Constant", [], [f"{prefix}/shape"], name=f"{prefix}/shape",
                                 value=helper.make_tensor(f"{prefix}/shape_value", TensorProto.INT64,
                                                          [len(zero_point_shape)], zero_point_shape))
        nodes += [shape, helper.make_node("Reshape", [point, shape.output[0]], [f"{prefix}/zero_point_shaped"],
                                          name=f"{prefix}/zero_point_shaped")]
        point = nodes[-1].output[0]
    nodes.append(helper.make_node("Sub", [cast.output[0], point], [f"{prefix}/centred"], name=f"{prefix}/centred"))
    return nodes[-1].output[0], nodes
