"""Empirical bias correction for static int8: give every quantized Conv and Gemm the output mean of its fp32 self.

Rounding a layer's weights to int8 (and its inputs to uint8) shifts the mean of each output channel, and the shift
passes on through every later layer; on the real EfficientNet-Lite0 weight rounding alone changed 10% of the top-1
answers on photographs, most of it such a shift. Measuring, on the calibration images, each channel's mean output in
the quantized graph and in the fp32 graph and moving the difference into the layer's int32 bias takes it away at no
run-time cost (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019,
section 4.2, empirical variant; Finkelstein et al., "Fighting Quantization Bias With Bias", 2019). onnxruntime's
quantizer has no such pass, so it is written here over its QDQ output.

Layers are corrected one at a time in graph order, each measured with every layer before it already corrected.
Correcting all of them from one measurement does not work: each layer's shift includes what its inputs' shifts
passed on, a 1x1 convolution sums that over its input channels, and on Lite0 that made the answers worse with every
repeat (28% agreement after one).
Only the QDQ form is corrected: its Conv/Gemm outputs are float tensors that can be read before they are quantized.

With `learn_rounding`, the int8 weights of each small-filter Conv (depthwise, a stem, a 1x1 over few channels) are
first re-rounded up or down to fit its fp32 outputs (rounding.py), in the same layer-by-layer pass, and its bias
corrected after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgekd.deploy.export import quiet_onnxruntime
from edgekd.deploy.rounding import ConvGeometry, RoundingFit, layer_moments, worth_learning
from edgekd.deploy.rounding import learn_rounding as fit_rounding

CORRECTED_OPS = ("Conv", "Gemm")
# Per-channel means over this many images (times every spatial position) are precise to a small fraction of a
# channel's spread; each layer costs a pass over them, so more images buy little and cost a pass each.
CORRECTION_IMAGES = 64
INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@dataclass(frozen=True)
class BiasCorrection:
    """What the pass did: how many layers it moved, on how many images, and how far their output means sat from
    fp32's when each one's turn came, in units of the channel's fp32 spread (mean over layers and channels of
    |shift| / std). After the pass each layer's mean on these images is fp32's, up to the int32 bias step."""

    layers: int
    images: int
    shift: float
    rounded: int = 0  # layers whose learned rounding was kept (it lowered their held-out output error)
    flipped: float = 0.0  # share of those layers' weights rounded the other way from nearest


@dataclass(frozen=True)
class _QuantizedBias:
    output: str  # its output tensor in the quantized graph (the quantizer may rename it after folding a Clip/Relu)
    reference_output: str  # its output in the fp32 graph (found by node name: the quantizer keeps node names)
    values: str  # the int32 initializer the bias DequantizeLinear reads
    scale: str  # that DequantizeLinear's scale initializer (one per output channel, or one for all)
    input: str = ""  # the layer's (dequantized) input in the quantized graph
    weight_values: str = ""  # the int8 weight initializer and its per-channel scale
    weight_scale: str = ""
    reference_weight: str = ""  # the fp32 weight initializer in the reference graph
    geometry: ConvGeometry | None = None  # a 2-D small-filter Conv to re-round (rounding.worth_learning); else None


def correct_bias(reference: Path, quantized: Path, images: np.ndarray, *, max_images: int = CORRECTION_IMAGES,
                 batch_size: int = 8, learn_rounding: bool = False) -> BiasCorrection:
    """Move each quantized Conv/Gemm's output-mean error on `images` into its int32 bias, in place in `quantized`.

    `reference` is the fp32 graph `quantized` was made from (same node names: onnxruntime's quantizer keeps them).
    Layers are corrected one at a time in graph order, each measured with every layer before it already corrected;
    with `learn_rounding`, small-filter Convs' weights are re-rounded to fit their fp32 outputs before the bias.
    """
    model, fp32 = onnx.load(str(quantized)), onnx.load(str(reference))
    biases = _quantized_biases(model, fp32)
    if not biases:
        return BiasCorrection(layers=0, images=0, shift=0.0)
    images = images[:max_images].astype(np.float32)
    target, spread = _channel_moments(fp32, [b.reference_output for b in biases], images, batch_size)
    initializers = {init.name: init for init in model.graph.initializer}
    runner = _PiecewiseRunner(model, images, batch_size)
    fp32_runner = _PiecewiseRunner(fp32, images, batch_size) if learn_rounding else None
    fp32_weights = {init.name: init for init in fp32.graph.initializer}
    before, fits = [], []
    for i, bias in enumerate(biases):
        if fp32_runner is not None and bias.geometry is not None:
            fits.append(_round_layer(bias, initializers, fp32_weights, runner, fp32_runner))
            fp32_runner.forget(bias.reference_output)
            fp32_runner.keep_only_what_needs([b.reference_output for b in biases[i + 1:]])
        mean = _mean_per_channel(runner.compute(bias.output))
        before.append(_relative(mean - target[i], spread[i]))
        _subtract(initializers[bias.values], numpy_helper.to_array(initializers[bias.scale]), mean - target[i])
        runner.forget(bias.output)  # computed with the old bias: the next layer's pass recomputes it
        runner.keep_only_what_needs([b.output for b in biases[i + 1:]])
    onnx.save(model, str(quantized))
    kept = [fit for fit in fits if fit.kept]
    return BiasCorrection(layers=len(biases), images=len(images), shift=float(np.mean(before)), rounded=len(kept),
                          flipped=float(np.mean([fit.flipped for fit in kept])) if kept else 0.0)


def _round_layer(layer: _QuantizedBias, initializers: dict[str, onnx.TensorProto],
                 fp32_weights: dict[str, onnx.TensorProto], runner: _PiecewiseRunner,
                 fp32_runner: _PiecewiseRunner) -> RoundingFit:
    """Re-round one Conv's int8 weights (in place in `initializers`) to fit its fp32 outputs on the runners' images,
    from the inputs the layers before it, already re-rounded and corrected, give it."""
    assert layer.geometry is not None
    quantized = numpy_helper.to_array(initializers[layer.weight_values])
    scale = numpy_helper.to_array(initializers[layer.weight_scale]).astype(np.float64)
    bias_scale = numpy_helper.to_array(initializers[layer.scale]).astype(np.float64)
    bias = numpy_helper.to_array(initializers[layer.values]).astype(np.float64) * bias_scale
    weight = numpy_helper.to_array(fp32_weights[layer.reference_weight]).astype(np.float64)
    fit_on, held_out = layer_moments(runner.compute(layer.input), fp32_runner.compute(layer.reference_output), bias,
                                     layer.geometry, tuple(weight.shape[2:]))
    rounded, fit = fit_rounding(weight, np.broadcast_to(scale, weight.shape[:1]), quantized, fit_on, held_out,
                                layer.geometry.group)
    initializers[layer.weight_values].CopyFrom(numpy_helper.from_array(rounded, layer.weight_values))
    runner.forget(layer.output)
    return fit


class _PiecewiseRunner:
    """Runs a graph over a fixed set of images a piece at a time, keeping the tensors that later pieces read.

    onnxruntime runs every node of a graph whatever is fetched, so measuring 50 layers one after the other from the
    input costs 50 passes (49 s for Lite0 at 224 px on 76 images); from kept tensors it costs about two."""

    def __init__(self, model: onnx.ModelProto, images: np.ndarray, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        self.producers = {out: node for node in model.graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name for init in model.graph.initializer}
        self.input = model.graph.input[0].name
        self.kept: dict[str, np.ndarray] = {self.input: images}
        self.per_image = _per_image_tensors(model, images)

    def compute(self, name: str) -> np.ndarray:
        if name not in self.kept:
            self._run(self._nodes_for(name), name)
        return self.kept[name]

    def forget(self, name: str) -> None:
        self.kept.pop(name, None)

    def keep_only_what_needs(self, targets: list[str]) -> None:
        """Let go of every kept tensor that computing `targets` from what is kept will not read (the images stay:
        what no kept tensor covers, such as shape arithmetic, is computed from them again)."""
        needed = {i for node in self._nodes_for(*targets) for i in node.input if i in self.kept}
        for name in [n for n in self.kept if n not in needed and n not in targets and n != self.input]:
            del self.kept[name]

    def _nodes_for(self, *names: str) -> list[onnx.NodeProto]:
        needed, pending = set(), [n for n in names if n not in self.kept]
        while pending:
            node = self.producers.get(pending.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                pending.extend(i for i in node.input if i and i not in self.kept and i not in self.initializers)
        return [node for node in self.model.graph.node if id(node) in needed]  # graph order is topological

    def _run(self, nodes: list[onnx.NodeProto], wanted: str) -> None:
        """Run `nodes` over every image and keep `wanted` and what nodes outside the piece read (a residual branch's
        input, say): keeping every tensor of a piece ran a DeiT-tiny with QDQ on every op out of 24 GB."""
        inside = {id(node) for node in nodes}
        produced = [out for node in nodes for out in node.output if out in self.per_image and (
            out == wanted or any(id(reader) not in inside for reader in self.consumers.get(out, [])))]
        feeds = sorted({i for node in nodes for i in node.input if i in self.kept})
        used = {i for node in nodes for i in node.input}
        graph = onnx.helper.make_graph(
            nodes, "piece",
            [onnx.helper.make_tensor_value_info(f, onnx.helper.np_dtype_to_tensor_dtype(self.kept[f].dtype), None)
             for f in feeds],
            [onnx.helper.make_empty_tensor_value_info(out) for out in produced],
            [init for init in self.model.graph.initializer if init.name in used])
        piece = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        session = _float_session(piece)
        count = len(self.kept[feeds[0]])
        chunks = [session.run(produced, {f: self.kept[f][i:i + self.batch_size] for f in feeds})
                  for i in range(0, count, self.batch_size)]
        for k, out in enumerate(produced):
            self.kept[out] = np.concatenate([chunk[k] for chunk in chunks])


def _per_image_tensors(model: onnx.ModelProto, images: np.ndarray) -> set[str]:
    """The tensors that hold one slice per image along their first axis, the only ones a piece can keep and
    concatenate over batches: found by running one image and two, since a graph also computes tensors that do not
    grow with the batch (dequantized weights, shapes) or grow along another axis (a transformer's stacked q, k, v)."""
    names = [out for node in model.graph.node for out in node.output if out]
    session = _float_session(model, names)
    feed = session.get_inputs()[0].name
    pair = np.concatenate([images[:1], images[1:2] if len(images) > 1 else images[:1]])
    one, two = session.run(names, {feed: images[:1]}), session.run(names, {feed: pair})
    grows = {name for name, a, b in zip(names, one, two)
             if a.ndim and a.shape[0] == 1 and b.shape == (2, *a.shape[1:])}
    return {feed} | grows


def _float_session(model: onnx.ModelProto, outputs: list[str] | None = None) -> ort.InferenceSession:
    """A session without graph optimisations: a QDQ graph then computes in float on the dequantized values (what the
    fused int8 kernels compute, up to rounding) and every intermediate tensor keeps its name. `outputs` replace the
    graph's own outputs when given."""
    if outputs is not None:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in outputs)
        model = probe
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with quiet_onnxruntime():
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _mean_per_channel(value: np.ndarray) -> np.ndarray:
    return value.mean(axis=tuple(a for a in range(value.ndim) if a != 1), dtype=np.float64)


def _relative(shift: np.ndarray, spread: np.ndarray) -> float:
    """Mean over channels of |shift| in units of the channel's fp32 spread (constant channels left out)."""
    alive = spread > 1e-6
    return float(np.mean(np.abs(shift[alive]) / spread[alive])) if alive.any() else 0.0


def _quantized_biases(model: onnx.ModelProto, reference: onnx.ModelProto) -> list[_QuantizedBias]:
    """The Conv/Gemm nodes whose weight and bias both come dequantized from initializers (the ones int8 runs)."""
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    reference_nodes = {node.name: node for node in reference.graph.node if node.name}
    reference_outputs = {name: node.output[0] for name, node in reference_nodes.items()}
    reference_weights = {init.name: init for init in reference.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in CORRECTED_OPS or len(node.input) < 3 or node.name not in reference_outputs:
            continue
        weight, bias = producers.get(node.input[1]), producers.get(node.input[2])
        if not (weight and bias and weight.op_type == bias.op_type == "DequantizeLinear"
                and weight.input[0] in initializers and bias.input[0] in initializers
                and initializers[bias.input[0]].data_type == onnx.TensorProto.INT32):
            continue
        found.append(_QuantizedBias(node.output[0], reference_outputs[node.name], bias.input[0], bias.input[1],
                                    **_weights(node, weight, reference_nodes[node.name], initializers,
                                               reference_weights)))
    return found


def _weights(node: onnx.NodeProto, weight: onnx.NodeProto, reference: onnx.NodeProto,
             initializers: dict[str, onnx.TensorProto], reference_weights: dict[str, onnx.TensorProto]) -> dict:
    """What re-rounding a Conv's weights needs (an empty dict for the layers it does not handle): an int8 weight
    quantized per output channel (axis 0) from an fp32 initializer of the same shape in the reference graph."""
    values, fp32 = initializers[weight.input[0]], reference_weights.get(reference.input[1])
    if (node.op_type != "Conv" or fp32 is None or values.data_type != onnx.TensorProto.INT8
            or len(weight.input) < 2 or weight.input[1] not in initializers
            or tuple(values.dims) != tuple(fp32.dims)):
        return {}
    scale = numpy_helper.to_array(initializers[weight.input[1]])
    axis = next((a.i for a in weight.attribute if a.name == "axis"), 1)
    if not (scale.size == 1 or (scale.size == values.dims[0] and axis == 0)):
        return {}
    if not worth_learning(tuple(values.dims)):
        return {}
    return {"input": node.input[0], "weight_values": weight.input[0], "weight_scale": weight.input[1],
            "reference_weight": fp32.name, "geometry": ConvGeometry.of(node, len(values.dims) - 2)}


def _channel_moments(model: onnx.ModelProto, outputs: list[str], images: np.ndarray,
                     batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-channel mean and standard deviation of each of `outputs` (channel = axis 1) over `images`, read from the
    graph run without optimisations, so a QDQ graph computes in float on the dequantized values and every
    intermediate tensor keeps its name."""
    session = _float_session(model, outputs)
    feed = session.get_inputs()[0].name
    sums: list[np.ndarray] = []
    squares: list[np.ndarray] = []
    positions: list[int] = []  # values per channel so far: batch x height x width
    for start in range(0, len(images), batch_size):
        values = session.run(outputs, {feed: images[start:start + batch_size]})
        for i, value in enumerate(values):
            axes = tuple(a for a in range(value.ndim) if a != 1)
            if i == len(sums):
                sums.append(np.zeros(value.shape[1]))
                squares.append(np.zeros(value.shape[1]))
                positions.append(0)
            sums[i] += value.sum(axis=axes, dtype=np.float64)
            squares[i] += np.square(value).sum(axis=axes, dtype=np.float64)
            positions[i] += value.size // value.shape[1]
    means = [total / n for total, n in zip(sums, positions)]
    spreads = [np.sqrt(np.maximum(square / n - mean ** 2, 0.0)) for square, n, mean in zip(squares, positions, means)]
    return means, spreads


def _subtract(values: onnx.TensorProto, scale: np.ndarray, shift: np.ndarray) -> None:
    """bias -= shift, in the int32 steps of the bias's own scale."""
    current = numpy_helper.to_array(values).astype(np.int64)
    steps = np.rint(shift / np.broadcast_to(scale.astype(np.float64), shift.shape)).astype(np.int64)
    values.CopyFrom(numpy_helper.from_array(np.clip(current - steps, INT32_MIN, INT32_MAX).astype(np.int32),
                                            values.name))
