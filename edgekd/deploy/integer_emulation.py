"""Dynamic int8's integer products computed in float, as a CPU whose int8 unit does not saturate computes them.

ONNX Runtime's MatMulInteger / ConvInteger (what dynamic quantization writes) multiply uint8 activations by int8
weights. Without VNNI, x86 does it with VPMADDUBSW, which sums each pair of products into int16 and saturates: on
the AVX2 host of these benchmarks a row of 255s times weights of 100-127 came out as 32,767 per pair (20,970,880
for 1,280 products where the exact sum is 36,606,925). VNNI and arm64's dot products add into int32 without that
loss, so a file made for them (no reduce_range) measured in an AVX2 CPU's kernels is judged worse than it runs
there: the 2-epoch EfficientNet-B0 student's dynamic int8 lost 4.96 points on the AVX2 host against 0.06 on an AMX
one. Rewritten here, each integer product is the same integers, zero points subtracted, multiplied in float32 and
cast back to int32: exact up to float32's rounding of sums above 2^24 (a relative error near 1e-7, far below the
int8 rounding itself). QOperator static files (QLinearConv, QLinearMatMul, QGemm: the same products, requantized
to the output's scale inside the op) get the same rewrite, followed by the op's requantization written out: times
scale_a x scale_b / scale_y, rounded half to even, plus the output zero point, clipped to its type. QDQ static files
need no rewrite: run without graph optimisation they already compute in float (verify.session).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

REQUANTIZED_PRODUCT_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm"})
# com.microsoft QAttention: a ViT block's q/k/v projection in int8 (dynamic int8 of an attention-fused graph)
INTEGER_PRODUCT_OPS = frozenset({"MatMulInteger", "ConvInteger", "QAttention"}) | REQUANTIZED_PRODUCT_OPS
_TYPE_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}


def integer_products_in_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every integer product (MatMulInteger, ConvInteger, QLinearConv, QLinearMatMul, QGemm)
    replaced by the same product in float32."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    types = {init.name: init.data_type for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in REQUANTIZED_PRODUCT_OPS:
            nodes += _requantized_product(node, ranks, types)
            continue
        if node.op_type == "QAttention":
            nodes += _attention_in_float(node)
            continue
        if node.op_type not in INTEGER_PRODUCT_OPS:
            nodes.append(node)
            continue
        prefix = f"{node.name or node.output[0]}/in_float"
        inputs = list(node.input) + [""] * (4 - len(node.input))
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        product, product_nodes = _product_in_float("Conv" if node.op_type == "ConvInteger" else "MatMul", inputs[0],
                                                   inputs[2], inputs[1], inputs[3], ranks.get(inputs[1], 4),
                                                   attributes, prefix)
        cast = helper.make_node("Cast", [product], [node.output[0]], name=f"{prefix}/int32", to=TensorProto.INT32)
        nodes += [*product_nodes, cast]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _attention_in_float(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """QAttention as the float Attention op it quantizes: its int8 input and weights dequantized (zero points
    subtracted, times their scales; a per-column weight scale meets the [hidden, 3 x hidden] weights' columns)."""
    prefix = f"{node.name or node.output[0]}/in_float"
    # input, weight, bias, input_scale, weight_scale, mask_index, input_zero_point, weight_zero_point, past
    x, w, bias, x_scale, w_scale, mask, x_zero, w_zero, past = (list(node.input) + [""] * 9)[:9]
    x_centred, nodes = _centred(x, x_zero, f"{prefix}/input", None)
    w_centred, w_nodes = _centred(w, w_zero, f"{prefix}/weight", None)
    nodes += [*w_nodes,
              helper.make_node("Mul", [x_centred, x_scale], [f"{prefix}/input_real"], name=f"{prefix}/input_real"),
              helper.make_node("Mul", [w_centred, w_scale], [f"{prefix}/weight_real"], name=f"{prefix}/weight_real")]
    inputs = [f"{prefix}/input_real", f"{prefix}/weight_real", bias, mask, past]
    while inputs[-1] == "":
        inputs.pop()
    attention = helper.make_node("Attention", inputs, list(node.output), name=f"{prefix}/attention",
                                 domain="com.microsoft")
    attention.attribute.extend(node.attribute)  # num_heads, unidirectional: the same attention
    return [*nodes, attention]


def _requantized_product(node: onnx.NodeProto, ranks: dict[str, int], types: dict[str, int]
                         ) -> list[onnx.NodeProto]:
    """QLinearConv / QLinearMatMul / QGemm as float ops: the integer product (zero points subtracted), plus the int32
    bias, times scale_a x scale_b (x alpha), then divided by the output scale, rounded, shifted by the output zero
    point and clipped to its type; QGemm without an output scale answers in float."""
    prefix = f"{node.name or node.output[0]}/in_float"
    inputs = list(node.input) + [""] * 9
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    alpha = attributes.get("alpha", 1.0)
    if node.op_type == "QGemm":  # A, a_scale, a_zero, B, b_scale, b_zero, C, y_scale, y_zero
        a, a_scale, a_zero, b, b_scale, b_zero, bias, y_scale, y_zero = inputs[:9]
        attributes = {key: attributes.get(key, 0) for key in ("transA", "transB")}  # alpha joins the scales below
    else:  # x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero[, B]
        a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero, bias = inputs[:9]
    conv = node.op_type == "QLinearConv"
    rank = ranks.get(b, 4)
    out_channel = [-1] + [1] * (rank - 2) if conv else None  # a conv's per-channel values meet its output [N, M, ...]
    op_type = {"QLinearConv": "Conv", "QLinearMatMul": "MatMul", "QGemm": "Gemm"}[node.op_type]
    total, nodes = _product_in_float(op_type, a, a_zero, b, b_zero, rank, attributes, prefix)
    if bias:
        shaped, bias_nodes = _as_float(bias, f"{prefix}/bias", out_channel)
        nodes += [*bias_nodes, helper.make_node("Add", [total, shaped], [f"{prefix}/biased"], name=f"{prefix}/bias")]
        total = nodes[-1].output[0]
    nodes.append(helper.make_node("Mul", [a_scale, b_scale], [f"{prefix}/scale"], name=f"{prefix}/scale"))
    scale = nodes[-1].output[0]
    if y_scale:
        nodes.append(helper.make_node("Div", [scale, y_scale], [f"{prefix}/requantize"], name=f"{prefix}/requantize"))
        scale = nodes[-1].output[0]
    if alpha != 1.0:
        nodes.append(helper.make_node("Mul", [scale, _constant(nodes, f"{prefix}/alpha", alpha)],
                                      [f"{prefix}/alpha_scale"], name=f"{prefix}/alpha_scale"))
        scale = nodes[-1].output[0]
    if out_channel is not None:
        scale, shape_nodes = _reshaped(scale, out_channel, f"{prefix}/scale")
        nodes += shape_nodes
    last = node.output[0] if not y_scale else f"{prefix}/scaled"
    nodes.append(helper.make_node("Mul", [total, scale], [last], name=f"{prefix}/scaled"))
    if not y_scale:
        return nodes
    out_type = types.get(y_zero, TensorProto.UINT8)  # ONNX's default output type without a zero point
    low, high = _TYPE_RANGES[out_type]
    rounded = helper.make_node("Round", [last], [f"{prefix}/rounded"], name=f"{prefix}/rounded")  # half to even
    nodes.append(rounded)
    shifted = rounded.output[0]
    if y_zero:
        point, point_nodes = _as_float(y_zero, f"{prefix}/y_zero", None)
        nodes += [*point_nodes, helper.make_node("Add", [shifted, point], [f"{prefix}/shifted"],
                                                 name=f"{prefix}/shifted")]
        shifted = nodes[-1].output[0]
    nodes += [helper.make_node("Clip", [shifted, _constant(nodes, f"{prefix}/low", low),
                                        _constant(nodes, f"{prefix}/high", high)], [f"{prefix}/clipped"],
                               name=f"{prefix}/clipped"),
              helper.make_node("Cast", [f"{prefix}/clipped"], [node.output[0]], name=f"{prefix}/typed", to=out_type)]
    return nodes


def _product_in_float(op_type: str, a: str, a_zero: str, b: str, b_zero: str, b_rank: int,
                      attributes: dict, prefix: str) -> tuple[str, list[onnx.NodeProto]]:
    """The integer product of `a` and `b`, zero points subtracted, as a float32 Conv / MatMul / Gemm: (its output,
    the nodes). A per-row zero point of A ([M]) meets A's rows as [M, 1]; a per-output-channel zero point of a
    conv's weights ([M]) meets them as [M, 1, 1, 1] (2-D; one 1 per further axis), of a transposed Gemm's [N, K]
    weights as [N, 1]; a MatMul's per-column zero point ([N]) broadcasts as it is."""
    conv = op_type == "Conv"
    b_shape = [-1] + [1] * (b_rank - 1) if conv else ([-1, 1] if attributes.get("transB") else None)
    a_centred, nodes = _centred(a, a_zero, f"{prefix}/a", None if conv else [-1, 1])
    b_centred, b_nodes = _centred(b, b_zero, f"{prefix}/b", b_shape)
    product = helper.make_node(op_type, [a_centred, b_centred], [f"{prefix}/product"], name=f"{prefix}/op",
                               **attributes)
    return product.output[0], [*nodes, *b_nodes, product]


def _constant(nodes: list[onnx.NodeProto], name: str, value: float) -> str:
    """Appends a float32 scalar Constant to `nodes`; returns its output."""
    nodes.append(helper.make_node("Constant", [], [name], name=name,
                                  value=helper.make_tensor(f"{name}_value", TensorProto.FLOAT, [], [float(value)])))
    return name


def _as_float(value: str, prefix: str, shape: list[int] | None) -> tuple[str, list[onnx.NodeProto]]:
    cast = helper.make_node("Cast", [value], [f"{prefix}/float"], name=f"{prefix}/float", to=TensorProto.FLOAT)
    if shape is None:
        return cast.output[0], [cast]
    shaped, nodes = _reshaped(cast.output[0], shape, prefix)
    return shaped, [cast, *nodes]


def _reshaped(value: str, shape: list[int], prefix: str) -> tuple[str, list[onnx.NodeProto]]:
    constant = helper.make_node("Constant", [], [f"{prefix}/shape"], name=f"{prefix}/shape",
                                value=helper.make_tensor(f"{prefix}/shape_value", TensorProto.INT64, [len(shape)],
                                                         shape))
    reshape = helper.make_node("Reshape", [value, constant.output[0]], [f"{prefix}/shaped"], name=f"{prefix}/shaped")
    return reshape.output[0], [constant, reshape]


def _centred(value: str, zero_point: str, prefix: str, zero_point_shape: list[int] | None
             ) -> tuple[str, list[onnx.NodeProto]]:
    """`value` - `zero_point` in float32 (the zero point reshaped to `zero_point_shape` first, when given)."""
    cast = helper.make_node("Cast", [value], [f"{prefix}/float"], name=f"{prefix}/float", to=TensorProto.FLOAT)
    if not zero_point:
        return cast.output[0], [cast]
    point, nodes = _as_float(zero_point, f"{prefix}/zero_point", zero_point_shape)
    nodes.append(helper.make_node("Sub", [cast.output[0], point], [f"{prefix}/centred"], name=f"{prefix}/centred"))
    return nodes[-1].output[0], [cast, *nodes]
