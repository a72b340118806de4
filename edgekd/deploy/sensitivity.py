"""Which nodes quantization hurts most: the accuracy guard keeps those in float and quantizes again.

Measured with onnxruntime's own QDQ debugging tools (`onnxruntime.quantization.qdq_loss_debug`): the QDQ model runs
with every activation exposed, and each quantized tensor is compared before its QuantizeLinear and after its
DequantizeLinear (the tool's "qdq_err"): the error that tensor's own quantization adds, whatever reached it from
upstream. It is measured per channel (noise / signal power, at most 1: destroyed) and averaged over channels.

Comparing with the fp32 model's tensor instead (what this ranking did before) mixes in every error from upstream,
and subtracting the worst input's error to take it back out blames nobody down a chain of tensors that share one
ruined range: with one outlier channel in a residual stream, each Add and Conv along it reads a tensor as ruined as
its own output, so the guard kept the wrong nodes in float, round after round, and the model got worse (agreement
with fp32 52% -> 4.5% on the outlier-channel Lite0 of tests/test_real_weights_fidelity.py) until 32 nodes were float.

Its blind spot: a tensor computed from inputs that are already coarse in the QDQ graph adds little error of its
own even when its range is ruinous. MobileNetV3-large's classifier input (features within +-0.3, a few reaching 36)
scores 0.004 here, 11th, and 0.52 when its fp32 values go through its own scale alone
(benchmarks/mobilenetv3_int8_agreement.py). Ranking by that instead kept worse nodes on the real Lite0 (152 photo
crops, 2-8 nodes in float: 94.1-94.7% agreement against this ranking's 95.4-96.1%), so this one stays.

Producers are read from the *quantized* graph: when the quantizer fuses a Conv with the ReLU/Clip after it, the Conv
there produces the clipped tensor, and the value it hands the QuantizeLinear is not clipped yet: the fp32 graph's
activation is applied to it first (the clipping is the model's, not an error).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                     modify_model_output_intermediate_tensors)

from edgekd.deploy.activation_ranges import images_per_run
from edgekd.deploy.verify import INPUT_NAME

_EPS = 1e-12
_DEAD_CHANNEL = 1e-3  # a channel quieter than this share of the tensor's median channel is measured against that floor
_DEQUANTIZED = "_DequantizeLinear_Output"  # qdq_loss_debug's (and the quantizer's) suffix of a dequantized tensor
_SAVED = "_ReshapedSavedOutput"  # qdq_loss_debug's suffix of the flattened copy it returns of a tensor
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class NodeSensitivity:
    """One node, and the tensor it is ranked for (which it produces or reads) with the relative squared error that
    tensor's quantization adds (0 = lossless)."""

    name: str
    op_type: str
    added_error: float
    tensor: str


class _Images(CalibrationDataReader):
    """One image at a time: qdq_loss_debug concatenates per-run outputs, which need equal batch sizes."""

    def __init__(self, images: np.ndarray):
        self.images, self.position = images, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        self.position += 1
        return {INPUT_NAME: np.asarray(self.images[self.position - 1:self.position], dtype=np.float32)}


def rank_sensitive_nodes(fp32_path: Path, quant_path: Path, images: np.ndarray,
                         skip: tuple[str, ...] = ()) -> list[NodeSensitivity]:
    """Nodes of the model given to the quantizer (`fp32_path`) in the order to keep them in float, worst first.

    Tensors are ranked by the error their own quantization adds (quantization_noise); each brings its producer and
    then every node that reads it, all with the tensor's score:
    ONNX Runtime quantizes a tensor for any quantized node that reads it, so keeping one tensor in float (an outlier
    channel, say) takes its producer and its consumers together.
    """
    noise = quantization_noise(fp32_path, quant_path, images)
    fp32_nodes = {node.name for node in onnx.load(str(fp32_path)).graph.node}
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in onnx.load(str(quant_path)).graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        producer.update({out: node for out in node.output})
        for name in node.input:
            consumers.setdefault(name.removesuffix(_DEQUANTIZED), []).append(node)
    scored = [(error, tensor, producer[tensor]) for tensor, error in noise.items()
              if tensor in producer]  # the graph input has no producer: nothing to keep in float
    ranked, seen = [], set(skip)
    for added, tensor, node in sorted(scored, key=lambda item: item[0], reverse=True):
        for member in (node, *consumers.get(tensor, ())):
            if member.name in fp32_nodes and member.name not in seen:
                seen.add(member.name)
                ranked.append(NodeSensitivity(member.name, member.op_type, added, tensor))
    return ranked


# The graph runs a few images at a time (activation_ranges.images_per_run: RANGE_BATCH, fewer where every tensor of
# the QDQ graph for them would pass ACTIVATION_BUDGET): 32 images of EfficientNet-B0 at 224 px held at once took
# 7.5 GB, 4 of ConvNeXt-tiny 7.5 GB (benchmarks/results/quantization_memory.md).


def quantization_noise(fp32_path: Path, quant_path: Path, images: np.ndarray) -> dict[str, float]:
    """Relative error each activation's own quantization adds in the QDQ model, over `images`: the tensor it
    dequantizes against the value it quantized (with the fp32 graph's ReLU/Clip the quantizer folded into the range
    applied), per channel (noise / signal power), averaged over channels."""
    bounds = _activation_bounds(onnx.load(str(fp32_path)))
    channels = _channel_counts(fp32_path)
    power = _ChannelPower()
    with tempfile.TemporaryDirectory(prefix="edgekd-qdq-debug-") as work:
        quant_aug = Path(work) / "quant.onnx"
        modify_model_output_intermediate_tensors(str(quant_path), str(quant_aug))
        batch = _images_per_run(quant_aug)
        for start in range(0, len(images), batch):
            activations = collect_activations(str(quant_aug), _Images(images[start:start + batch]))
            for name, pair in create_activation_matching(activations).items():
                before, after = np.stack(pair["pre_qdq"]), np.stack(pair["post_qdq"])
                if before.shape != after.shape:
                    continue
                if name in bounds:
                    before = np.clip(before, *bounds[name])
                power.add(name, before, after, channels.get(name, 1))
    return power.noise()


class _ChannelPower:
    """Per tensor and channel, the signal's and the noise's summed power, added a few images at a time."""

    def __init__(self) -> None:
        self.signal: dict[str, np.ndarray] = {}
        self.error: dict[str, np.ndarray] = {}
        self.values: dict[str, int] = {}  # values per channel so far (images x H x W)

    def add(self, name: str, reference: np.ndarray, actual: np.ndarray, count: int) -> None:
        """`reference` and `actual`: images x flattened C x H x W arrays."""
        if reference.shape[1] % count:
            count = 1
        reference, actual = (a.reshape(len(a), count, -1).astype(np.float64) for a in (reference, actual))
        signal, error = np.sum(reference ** 2, axis=(0, 2)), np.sum((reference - actual) ** 2, axis=(0, 2))
        if name in self.signal:
            self.signal[name] = self.signal[name] + signal
            self.error[name] = self.error[name] + error
        else:
            self.signal[name], self.error[name], self.values[name] = signal, error, 0
        self.values[name] += reference.shape[0] * reference.shape[2]

    def noise(self) -> dict[str, float]:
        """Mean over channels of noise / signal power, each at most 1 (a channel is at worst destroyed)."""
        result = {}
        for name, signal in self.signal.items():
            # dead (all-zero) channels: no ratio to speak of (the floors are on mean power, times the values summed)
            floor = max(_DEAD_CHANNEL * float(np.median(signal)), _EPS * self.values[name])
            result[name] = float(np.mean(np.minimum(self.error[name] / np.maximum(signal, floor), 1.0)))
        return result


def _activation_bounds(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """(low, high) of each tensor a Relu or a Clip with constant bounds produces: what a quantizer that folds the
    activation into the tensor's range still computes."""
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    bounds = {}
    for node in model.graph.node:
        if node.op_type == "Relu":
            bounds[node.output[0]] = (0.0, np.inf)
        elif node.op_type == "Clip":
            low, high = (node.input[i] if len(node.input) > i else "" for i in (1, 2))
            if (low and low not in constants) or (high and high not in constants):
                continue
            bounds[node.output[0]] = (float(constants[low]) if low else -np.inf,
                                      float(constants[high]) if high else np.inf)
    return bounds


def tensor_noise(fp32_path: Path, quant_path: Path, images: np.ndarray) -> dict[str, float]:
    """Relative error of every activation the QDQ model quantizes against the same tensor of the float model, over
    `images`: per channel (noise / signal power), averaged over channels. (compute_activation_error's one SQNR per
    tensor is dominated by its loudest channel: an outlier channel 100x the others hides their destruction.)"""
    channels = _channel_counts(fp32_path)
    power = _ChannelPower()
    with tempfile.TemporaryDirectory(prefix="edgekd-qdq-debug-") as work:
        float_aug, quant_aug = Path(work) / "float.onnx", Path(work) / "quant.onnx"
        modify_model_output_intermediate_tensors(str(fp32_path), str(float_aug))
        modify_model_output_intermediate_tensors(str(quant_path), str(quant_aug))
        step = _images_per_run(quant_aug)
        for start in range(0, len(images), step):
            batch = images[start:start + step]
            float_activations = collect_activations(str(float_aug), _Images(batch))
            quant_activations = collect_activations(str(quant_aug), _Images(batch))
            for name, pair in create_activation_matching(quant_activations, float_activations).items():
                if "float" not in pair or "post_qdq" not in pair:
                    continue
                # qdq_loss_debug saves each image's tensor flattened (C x H x W, batch 1): back to (images, C, -1)
                reference, actual = np.stack(pair["float"]), np.stack(pair["post_qdq"])
                if reference.shape != actual.shape:
                    continue
                power.add(name, reference, actual, channels.get(name, 1))
    return power.noise()


def _images_per_run(augmented: Path) -> int:
    """Images per run of qdq_loss_debug's augmented graph: it returns a flattened copy of every tensor."""
    model = onnx.load(str(augmented))
    return images_per_run(model, {output.name.removesuffix(_SAVED) for output in model.graph.output})


def _channel_counts(model_path: Path) -> dict[str, int]:
    """Each activation's channel count (axis 1), from ONNX shape inference."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(model_path))).graph
    counts = {}
    for value in (*graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].dim_value > 0:
            counts[value.name] = dims[1].dim_value
    return counts
