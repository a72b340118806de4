"""fp32 ONNX -> int8 (static QDQ/QOperator or dynamic) or fp16, with public onnxruntime.quantization APIs only.

Presets are chosen by the target's ISA. What pays on x86 (measured with ORT at 1 thread, batch 1, 224 px):
uint8 activations with int8 weights (U8S8) turn every conv into an int8 kernel (resnet 3.1x faster than fp32),
int8 activations (S8S8) leave half of them in float (1.2x); without VNNI, U8S8 needs `reduce_range` (7-bit
weights) against VPMADDUBSW saturation. On arm64 (and XNNPACK) S8S8 QDQ is the native form.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_dynamic, quantize_static)
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

from edgekd.artifacts import atomic_path
from edgekd.errors import EdgekdError, first_line
from edgekd.deploy.correction_check import BOTH, correct_where_it_helps, kept_corrections
from edgekd.deploy.entropy_threshold import entropy_threshold
from edgekd.deploy.export import check_model, is_transformer, quiet_onnxruntime
from edgekd.select.latency import ORT_RUN_ERRORS
from edgekd.deploy.sensitivity import NodeSensitivity, rank_sensitive_nodes
from edgekd.deploy.verify import (INPUT_NAME, PARITY_RTOL, EvalSet, drop_standard_error, emulates_target,
                                  metrics_from_predictions, onnx_logits)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8_static", "int8_dynamic", "fp16")
ISAS = ("avx2", "avx512", "avx512_vnni", "arm64")
# The one calibration-size policy: int8 static calibrates on a stratified, shuffled sample of CALIBRATION_IMAGES
# training images (every static int8 file edgekd writes: the bundle, `edgekd export`, the teacher's int8 reference);
# fewer than MIN_CALIBRATION_IMAGES gives ranges from a handful of images, clipping on everything else.
CALIBRATION_IMAGES = 256
MIN_CALIBRATION_IMAGES = 32
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
# "auto" (the guard's default): minmax, and when that loses more than the guard allows, percentile then entropy,
# before any node is kept in float. Clipping the rare extreme activations is often all a model needs.
AUTO_CALIBRATION = ("minmax", "percentile", "entropy")
CALIBRATION_CHOICES = ("auto", *CALIBRATION_METHODS)
_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
DYNAMIC_OP_TYPES = ("MatMul", "Attention")  # dynamic Conv runs 5-12x slower than fp32 on x86: never by default


@dataclass(frozen=True)
class QuantPreset:
    """One way to quantize: how weights and activations are typed and which ops are touched."""

    name: str
    mode: str  # "static" (calibrated activation ranges) or "dynamic" (ranges computed at run time)
    quant_format: str = "qdq"  # "qdq" (portable, what XNNPACK/NNAPI/QNN expect) or "qoperator" (QLinearConv...)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: avoids int16 saturation in AVX2/AVX-512 (non-VNNI) u8s8 kernels
    op_types: tuple[str, ...] | None = None  # None: every op type the quantizer supports
    # Transformers: only MatMuls with a weight (activation-by-activation MatMuls such as Q.K^T stay float), and their
    # outputs stay float, so ORT runs them as MatMulIntegerToFloat and LayerNorm/Softmax/GELU/residual Adds see fp32.
    weight_matmuls_only: bool = False
    float_outputs: bool = False
    # Static QDQ: after calibration, each Conv/Gemm's int32 bias absorbs the output-mean shift int8 rounding causes
    # (bias_correction.py). On the real Lite0 it lifts agreement with fp32 on every photo crop from 84.2% to 92.1%.
    bias_correction: bool = False
    # With bias correction: the int8 weights of small-filter convs (depthwise, stem, small 1x1) rounded up or down to
    # fit their fp32 outputs (rounding.py) in the same pass, before their bias is corrected. On the real Lite0:
    # agreement with fp32 on every photo crop 93.4% -> 95.4%, mean KL from fp32 0.0147 -> 0.0046 (int8_rounding.md).
    learned_rounding: bool = False
    # Static QDQ: the model's outputs (the logits) are left unrounded (_float_graph_outputs); False keeps the
    # quantizer's QuantizeLinear/DequantizeLinear on them, as onnxruntime writes it (benchmarks compare the two).
    float_logits: bool = True
    # With bias correction: keep whichever of both corrections, bias correction alone and neither puts the answers
    # closest to fp32's on held-out calibration images (correction_check.py); False keeps them whatever they do
    # (benchmarks measure each form that way).
    check_corrections: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QuantPreset:
        return cls(**{**raw, "op_types": tuple(raw["op_types"]) if raw.get("op_types") else None})


WEIGHT_OP_TYPES = ("MatMul", "Gemm")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ops int8 speeds up (the guard's input-side nodes)


U8S8 = QuantPreset("u8s8_qdq_per_channel", "static", bias_correction=True, learned_rounding=True)
U8S8_REDUCED = replace(U8S8, name="u8s8_qdq_per_channel_reduce_range", reduce_range=True)
S8S8 = QuantPreset("s8s8_qdq_per_channel", "static", activation_type="int8", bias_correction=True,
                   learned_rounding=True)
# QLinearConv's outputs are int8 already: there is no float output to measure a shift on.
U8S8_QOPERATOR = replace(U8S8, name="u8s8_qoperator_per_channel", quant_format="qoperator", bias_correction=False,
                         learned_rounding=False)
U8S8_PER_TENSOR = replace(U8S8, name="u8s8_qdq_per_tensor", per_channel=False)
DYNAMIC_MATMUL = QuantPreset("dynamic_matmul", "dynamic", quant_format="qoperator", per_channel=False,
                             op_types=DYNAMIC_OP_TYPES)
DYNAMIC_MATMUL_REDUCED = replace(DYNAMIC_MATMUL, name="dynamic_matmul_reduce_range", reduce_range=True)
# The static recipe for transformers: quantizing every op type (Softmax, LayerNorm inputs, residual Adds, Q.K^T)
# cost DeiT-tiny 10-12 points; weight MatMuls alone keep it within a point and run as fast as dynamic int8.
U8S8_MATMUL = replace(U8S8, name="u8s8_qdq_weight_matmul", op_types=WEIGHT_OP_TYPES, weight_matmuls_only=True,
                      float_outputs=True)

# The first static and first dynamic preset of each ISA are its defaults; the rest are what the search tries.
ISA_PRESETS: dict[str, tuple[QuantPreset, ...]] = {
    "avx512_vnni": (U8S8, DYNAMIC_MATMUL, U8S8_QOPERATOR, S8S8, U8S8_PER_TENSOR),
    "avx512": (U8S8_REDUCED, DYNAMIC_MATMUL_REDUCED, U8S8, S8S8, DYNAMIC_MATMUL),
    "avx2": (U8S8_REDUCED, DYNAMIC_MATMUL_REDUCED, U8S8, S8S8, DYNAMIC_MATMUL),
    "arm64": (S8S8, DYNAMIC_MATMUL, U8S8, replace(S8S8, name="s8s8_qdq_per_tensor", per_channel=False)),
}


# Transformers put the weight-MatMul recipe first (their default), typed like the ISA's own default static preset.
TRANSFORMER_PRESETS: dict[str, QuantPreset] = {
    "avx512_vnni": U8S8_MATMUL,
    "avx512": replace(U8S8_MATMUL, name="u8s8_qdq_weight_matmul_reduce_range", reduce_range=True),
    "avx2": replace(U8S8_MATMUL, name="u8s8_qdq_weight_matmul_reduce_range", reduce_range=True),
    "arm64": replace(U8S8_MATMUL, name="s8s8_qdq_weight_matmul", activation_type="int8"),
}


def presets_for(isa: str, mode: str | None = None, transformer: bool = False) -> tuple[QuantPreset, ...]:
    """The presets of an ISA, defaults first; `mode` keeps only "static" or "dynamic" ones; `transformer` puts the
    weight-MatMul recipe first."""
    if isa not in ISA_PRESETS:
        raise EdgekdError(f"unknown ISA {isa!r}; use one of {', '.join(ISAS)}")
    presets = ((TRANSFORMER_PRESETS[isa],) if transformer else ()) + ISA_PRESETS[isa]
    return tuple(p for p in presets if mode is None or p.mode == mode)


def default_preset(isa: str, precision: str, transformer: bool = False) -> QuantPreset:
    return presets_for(isa, "static" if precision == "int8_static" else "dynamic", transformer)[0]


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed real images (N x C x H x W: an array or verify.NormalizedPixels) to the calibrator in
    small float32 batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16, input_name: str = INPUT_NAME):
        self.images, self.batch_size, self.input_name = images, batch_size, input_name
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = np.asarray(self.images[self.position:self.position + self.batch_size], dtype=np.float32)
        self.position += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0


def check_calibration(calibration: np.ndarray | None, input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Static int8 needs enough real images, shaped like the model's input."""
    if calibration is None or len(calibration) < MIN_CALIBRATION_IMAGES:
        have = 0 if calibration is None else len(calibration)
        raise EdgekdError(f"int8 static calibration needs at least {MIN_CALIBRATION_IMAGES} images, got {have}; "
                          "give more training images (--data) or use int8_dynamic")
    if calibration.ndim != 4 or (input_shape is not None and tuple(calibration.shape[1:]) != tuple(input_shape)):
        raise EdgekdError(f"calibration images have shape {tuple(calibration.shape[1:])}, the model wants "
                          f"{tuple(input_shape or ())}; preprocess them with the model's own preprocess.json")
    return calibration


def prepare_for_quantization(fp32_path: Path, out_path: Path, check_inputs: np.ndarray | None = None) -> Path:
    """quant_pre_process (symbolic shape inference + ORT graph optimisation, which the quantizer relies on), checked
    like an export: the prepared graph must reproduce the fp32 file's logits on `check_inputs` (random when None).

    Spatial means (squeeze-excite's `x.mean((2, 3), keepdim=True)`) become GlobalAveragePool, the same arithmetic,
    which ORT runs in int8 (QLinearGlobalAveragePool) where ReduceMean breaks the int8 chain with a float round trip.

    Some graphs (e.g. efficientvit_m2) defeat ORT's symbolic shape inference; ONNX's own shape inference is
    enough for the quantizer there, so retry without it rather than lose int8 for that model. A prepared graph that
    breaks parity is prepared again without ORT's optimisation, and is an error if it still does.
    """
    source, target = str(Path(fp32_path).resolve()), str(Path(out_path).resolve())
    with quiet_onnxruntime(), _inside_scratch_folder():
        try:
            quant_pre_process(source, target, skip_symbolic_shape=False)
        except Exception as error:  # noqa: BLE001 - ORT raises a bare Exception("Incomplete symbolic shape inference")
            if "symbolic shape" not in str(error):
                raise
            log.info("symbolic shape inference failed for %s; quantizing with ONNX shape inference only",
                     Path(fp32_path).name)
            quant_pre_process(source, target, skip_symbolic_shape=True)
        _finish_prepared(Path(target))
        if check_inputs is None:
            shape = _input_chw(check_model(Path(fp32_path)))
            check_inputs = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
        difference = _logit_difference(Path(source), Path(target), check_inputs)
        if difference is not None:
            log.info("quant_pre_process changed %s's logits by %.3g; preparing it without graph optimisation",
                     Path(fp32_path).name, difference)
            quant_pre_process(source, target, skip_optimization=True, skip_symbolic_shape=True)
            _finish_prepared(Path(target))
            difference = _logit_difference(Path(source), Path(target), check_inputs)
            if difference is not None:
                raise EdgekdError(f"onnxruntime's quant_pre_process changes {Path(fp32_path).name}'s logits by "
                                  f"{difference:.3g}; quantize it with --precision fp32 or report the model")
    return out_path


def _finish_prepared(path: Path) -> None:
    model = onnx.load(str(path))
    if _spatial_means_as_global_pools(model) + _name_every_node(model):
        onnx.save(model, str(path))


def _name_every_node(model: onnx.ModelProto) -> int:
    """Give unnamed nodes a name: the quantizer excludes nodes by name, so an unnamed one could be ranked the most
    sensitive and still not be kept in float."""
    taken = {node.name for node in model.graph.node}
    unnamed = [node for node in model.graph.node if not node.name]
    for index, node in enumerate(unnamed):
        name = f"{node.op_type}_unnamed_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    return len(unnamed)


def _spatial_means_as_global_pools(model: onnx.ModelProto) -> int:
    """Replace each ReduceMean over both spatial axes of a float N x C x H x W map, dimensions kept, by
    GlobalAveragePool (identical by definition); return how many. ORT's quantizer has no int8 ReduceMean, so each one
    left a dequantize/float/quantize round trip in the int8 graph (benchmarks/results/int8_graph_forms.md).

    Only 4-D maps: a mean over a token tensor's last axis is a normalisation statistic, and export.is_transformer
    reads ReduceMean as a sign of LayerNorm."""
    means = [node for node in model.graph.node if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx")]
    if not means:
        return 0
    float_maps = _float_4d_tensors(model)
    initializers = {init.name: init for init in model.graph.initializer}
    overridable = {value.name for value in model.graph.input}
    replaced = 0
    for node in means:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes")  # an attribute up to opset 17, the optional second input from opset 18
        if len(node.input) > 1 and node.input[1]:
            axes = None if node.input[1] not in initializers or node.input[1] in overridable else \
                np.atleast_1d(onnx.numpy_helper.to_array(initializers[node.input[1]])).tolist()
        if node.input[0] not in float_maps or attributes.get("keepdims", 1) != 1 or not axes \
                or any(not -4 <= int(a) < 4 for a in axes) or sorted(int(a) % 4 for a in axes) != [2, 3]:
            continue
        node.CopyFrom(onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
        replaced += 1
    return replaced  # an opset-18 axes initializer left unused: the quantizer's own clean-up drops it


def _float_4d_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    return {v.name for v in [*inferred.graph.value_info, *inferred.graph.input]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in floats
            and v.type.tensor_type.HasField("shape") and len(v.type.tensor_type.shape.dim) == 4}


def _logit_difference(reference: Path, candidate: Path, images: np.ndarray) -> float | None:
    """The largest |logit difference| when it is beyond export parity (PARITY_RTOL of the largest logit), else None."""
    expected, actual = onnx_logits(reference, images), onnx_logits(candidate, images)
    difference = float(np.abs(actual - expected).max())
    return difference if difference > PARITY_RTOL * max(1.0, float(np.abs(expected).max())) else None


@contextlib.contextmanager
def _inside_scratch_folder():
    """Run in a temporary working folder: ORT's symbolic shape inference dumps sym_shape_infer_temp.onnx and its
    external data into the current folder when it fails, which would litter the user's project."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="edgekd-quant-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(previous)


def quantize_onnx(fp32_path: Path, out_path: Path, precision: str, *, isa: str = "avx2",
                  calibration: np.ndarray | None = None, preset: QuantPreset | None = None,
                  calibration_method: str = "minmax", nodes_to_exclude: tuple[str, ...] = (),
                  prepared: bool = False, for_timing: bool = False) -> Path:
    """Write `fp32_path` at `precision` to `out_path` (whole or not at all) and return it.

    `preset` overrides the ISA's default; `prepared` says `fp32_path` already went through quant_pre_process
    (the option search prepares once and quantizes many times). `for_timing`: a file only to be timed (candidate
    selection) skips bias correction and learned rounding, which change weight values, not the graph or its speed.
    """
    if precision not in PRECISIONS:
        raise EdgekdError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    model = check_model(fp32_path)
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix="edgekd-quant-") as work:
        if precision == "fp32":
            shutil.copyfile(fp32_path, tmp)
        elif precision == "fp16":
            _to_fp16(model, tmp)
        else:
            preset = preset or default_preset(isa, precision, is_transformer(model))
            if for_timing:
                preset = replace(preset, bias_correction=False, learned_rounding=False)
            if preset.mode != precision.removeprefix("int8_"):
                raise EdgekdError(f"preset {preset.name} is {preset.mode}, not {precision}")
            images = check_calibration(calibration, _input_chw(model)) if preset.mode == "static" else None
            source = fp32_path if prepared else prepare_for_quantization(fp32_path, Path(work) / "prepared.onnx",
                                                                         None if images is None else images[:8])
            try:
                if images is not None:
                    _quantize_static(source, tmp, preset, images, calibration_method, nodes_to_exclude)
                else:
                    _quantize_dynamic(source, tmp, preset, nodes_to_exclude)
            except EdgekdError:
                raise
            except Exception as error:  # noqa: BLE001 - the quantizer fails in many ways on graphs it cannot handle
                detail = first_line(error)
                raise EdgekdError(f"onnxruntime could not quantize {fp32_path.name} with preset {preset.name} "
                                  f"({detail}); try another preset, int8_dynamic or fp32") from error
        check_model(tmp)
    return out_path


def _quantize_static(source: Path, target: Path, preset: QuantPreset, images: np.ndarray, method: str,
                     exclude: tuple[str, ...]) -> None:
    method = AUTO_CALIBRATION[0] if method == "auto" else method
    if method not in CALIBRATION_METHODS:
        raise EdgekdError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    extra: dict[str, Any] = {"ActivationSymmetric": preset.activation_type == "int8", "WeightSymmetric": True}
    if preset.weight_matmuls_only:  # the QDQ quantizer ignores its MatMulConstBOnly option: exclude them by name
        exclude += _activation_matmuls(source)
    if preset.float_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(preset.op_types or ())
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    # Histogram calibrators (entropy, percentile) fail in onnxruntime when the last batch is smaller than the others
    # ("inhomogeneous shape"): feed them one image at a time.
    reader = ArrayCalibrationReader(images, batch_size=16 if method == "minmax" else 1)
    with quiet_onnxruntime(), tempfile.TemporaryDirectory(prefix="edgekd-calibration-") as scratch:
        cache = _entropy_ranges(source, reader, preset, Path(scratch)) if method == "entropy" else None
        quantize_static(str(source), str(target), reader, calibration_cache_path=cache,
                        quant_format=_FORMATS[preset.quant_format], op_types_to_quantize=_op_types(preset),
                        per_channel=preset.per_channel, reduce_range=preset.reduce_range,
                        activation_type=_TYPES[preset.activation_type], weight_type=_TYPES[preset.weight_type],
                        nodes_to_exclude=list(exclude), calibrate_method=CALIBRATION_METHODS[method],
                        extra_options=extra)
    if preset.quant_format == "qdq" and preset.float_logits:
        _float_graph_outputs(target)
    if preset.bias_correction and preset.quant_format == "qdq":
        try:
            check = correct_where_it_helps(source, target, images, learn_rounding=preset.learned_rounding,
                                           judge=preset.check_corrections)
        except ORT_RUN_ERRORS as error:  # the correction runs the quantized graph: the first to see it fail
            raise EdgekdError(f"int8_static does not run: {first_line(error, 160)}; try another preset, "
                              "int8_dynamic or fp32") from error
        if check.correction is not None:
            log.info("bias correction: %d layers on %d images (output means were %.3f of a channel's spread off "
                     "fp32)", check.correction.layers, check.correction.images, check.correction.shift)
            if check.kept == BOTH:
                log.info("learned rounding: kept on %d layers, %.1f%% of their weights rounded the other way",
                         check.correction.rounded, 100 * check.correction.flipped)


# Entropy (KL) calibration: the window whose rounding to ENTROPY_LEVELS keeps the histogram's distribution closest.
# quantize_static builds onnxruntime's entropy calibrator with its defaults, 128 bins and 128 quantized bins, which
# leave it one candidate window, the whole range: "entropy" was minmax under another name (a 2-epoch EfficientNet-B0
# student: 15.3% agreement with fp32 from both). onnxruntime's search is Python loops: 2.2 s per tensor at TensorRT's
# 2048 bins (9 min for B0's 240 tensors), 0.2 s at 512; edgekd runs the same search 4.5x faster (entropy_threshold.py,
# benchmarks/results/entropy_threshold_512bins.md: the real Lite0's 95 tensors, the same window for each).
# Measured (2,000 test images; 152 photo crops): the B0 student without bias correction 92.9% agreement, top-1 +0.2
# (percentile 86.7%, -1.95; minmax 15.3%); the real Lite0 60.5% of every crop (minmax 95.4%): it clips ReLU6 ranges
# that need their top. 256 levels did no better (92.3%, 71.7%). The guard's "auto" tries it last and keeps whichever
# method loses least.
ENTROPY_BINS = 512
ENTROPY_LEVELS = 128


def _entropy_ranges(source: Path, reader: CalibrationDataReader, preset: QuantPreset, scratch: Path) -> Path:
    """Entropy-calibrated ranges for `source`, written where quantize_static reads a calibration cache. The window
    is symmetric about zero; each end is then held to the values seen (a ReLU output's window does not reach below
    0), so no level is spent where no value falls. The search is onnxruntime's, without its Python loops
    (entropy_threshold.py)."""
    calibrator = create_calibrator(source, _op_types(preset), augmented_model_path=str(scratch / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_LEVELS})
    calibrator.collect_data(reader)
    ranges = {name: (*entropy_threshold(histogram, ENTROPY_LEVELS), *histogram[:2])
              for name, histogram in calibrator.collector.histogram_dict.items()}
    save_tensors_data(TensorsData(CalibrationMethod.Entropy, ranges), scratch / "entropy.json")
    return scratch / "entropy.json"


def _float_graph_outputs(path: Path) -> int:
    """Take the QuantizeLinear/DequantizeLinear pair off each graph output: the model answers in float, unrounded.
    The quantizer rounds the logits to 256 levels over their calibrated range, which buys no speed (ORT runs the
    classifier as QGemm / MatMulIntegerToFloat with a float output either way) and flips near-ties: a 2-epoch
    EfficientNet-B0 student has logits spread over +-80 with a median top-2 margin of 1.7, and its int8 agreement with
    fp32 went from 79.0% to 85.7% (1,000 test images, percentile, no bias correction) with float logits; the real
    Lite0 on photo crops from 94.7% to 95.4%. Returns how many outputs it freed."""
    model = onnx.load(str(path))
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    freed = []
    for output in graph.output:
        dequantize = producer.get(output.name)
        quantize = producer.get(dequantize.input[0]) if dequantize is not None else None
        if (dequantize is None or dequantize.op_type != "DequantizeLinear" or quantize is None
                or quantize.op_type != "QuantizeLinear" or readers.get(quantize.output[0]) != 1
                or readers.get(quantize.input[0]) != 1):
            continue  # not a plain Q -> DQ -> output pair (the float tensor has other readers): leave it
        source = producer.get(quantize.input[0])
        if source is None:
            continue  # a graph input passed straight through
        source.output[list(source.output).index(quantize.input[0])] = output.name
        freed += [quantize, dequantize]
    if not freed:
        return 0
    for node in freed:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    parameters = {name for node in freed for name in node.input[1:]}  # the freed pairs' scales and zero points
    for init in [init for init in graph.initializer if init.name in parameters - used]:
        graph.initializer.remove(init)
    onnx.save(model, str(path))
    return len(freed) // 2


def _activation_matmuls(path: Path) -> tuple[str, ...]:
    """MatMuls of two activations (attention's Q.K^T and A.V): no weight to quantize, and int8 costs them accuracy."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return tuple(n.name for n in graph.node if n.op_type == "MatMul" and not set(n.input) & weights)


def _quantize_dynamic(source: Path, target: Path, preset: QuantPreset, exclude: tuple[str, ...]) -> None:
    with quiet_onnxruntime():
        quantize_dynamic(str(source), str(target), op_types_to_quantize=_op_types(preset),
                         per_channel=preset.per_channel, reduce_range=preset.reduce_range,
                         weight_type=_TYPES[preset.weight_type], nodes_to_exclude=list(exclude))


def _op_types(preset: QuantPreset) -> list[str] | None:
    return list(preset.op_types) if preset.op_types else None


def _to_fp16(model: onnx.ModelProto, target: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs so apps feed the same arrays."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(model)
    converted.convert_float_to_float16(keep_io_types=True)
    converted.topological_sort()  # the converter appends its input casts last; onnx.checker wants them first
    onnx.save(converted.model, str(target))


def _input_chw(model: onnx.ModelProto) -> tuple[int, ...] | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    return tuple(d.dim_value for d in dims) if all(d.dim_value for d in dims) else None


# ------------------------------------------------------------------------------------------ accuracy guard + search

Timing = Callable[[Path, str], "float | None"]  # (model file, its precision) -> p50 ms, None when unknown

@dataclass(frozen=True)
class GuardConfig:
    """When a quantized model is good enough, and how hard to try before giving up on a preset."""

    max_accuracy_drop: float = 1.0  # points of top-1 (of agreement with fp32 when the data has no labels)
    min_agreement: float | None = None  # optional floor (a share, 0-1) on top-1 agreement with the fp32 model
    max_rounds: int = 4  # rounds of "keep the most sensitive nodes in float, quantize again"
    first_exclusion: float = 0.05  # share of quantizable nodes kept in float after round 1; doubles each round
    min_speedup: float = 1.05  # int8 must beat fp32 by this factor (beyond timing noise) to be worth its error
    calibration_method: str = "auto"  # or one of CALIBRATION_METHODS; see AUTO_CALIBRATION

    def failure(self, drop: float, agreement: float) -> str | None:
        """Why a form that loses `drop` points (guard_drop) and agrees with fp32 on `agreement` fails the guard, or
        None when it passes: int8 forms and fp16 are held to the same rule."""
        if drop > self.max_accuracy_drop:
            return f"loses {drop:.2f} points (guard {self.max_accuracy_drop:g})"
        if self.min_agreement is not None and agreement < self.min_agreement:
            return f"agrees with fp32 on {agreement:.1%} of the images (--min-agreement {100 * self.min_agreement:g})"
        return None


def guard_drop(fp32_top1: float | None, top1: float | None, agreement: float) -> float:
    """Points a form loses: of top-1 against fp32's, or of agreement with fp32 when the images have no labels."""
    drop = 100.0 * (fp32_top1 - top1) if fp32_top1 is not None and top1 is not None else 100.0 * (1.0 - agreement)
    return round(drop, 6)  # 3/300 images is 1.0 point, not 1.0000000000000009


@dataclass(frozen=True)
class Trial:
    """One quantization attempt and its figures."""

    precision: str
    preset: QuantPreset
    excluded_nodes: tuple[str, ...]
    top1: float | None
    agreement: float
    accuracy_drop: float  # points
    passed: bool
    latency_ms: float | None = None
    size_bytes: int = 0
    error: str | None = None  # the quantizer could not handle this preset on this graph
    calibration_method: str | None = None  # static presets: how activation ranges were calibrated
    drop_se: float | None = None  # standard error of accuracy_drop on these images (verify.drop_standard_error)
    images: int = 0  # how many images measured it
    weight_corrections: str | None = None  # static QDQ: the bias correction / learned rounding the file kept
    float_nodes_by: str | None = None  # how its excluded nodes were chosen (FLOAT_NODE_SOURCES); None: none were

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "preset": self.preset.to_dict(), "excluded_nodes": list(self.excluded_nodes)}

    def describe_drop(self) -> str:
        """"accuracy drop 0.80 +- 0.45 points (1,000 images)": the figure with how precisely it is known."""
        spread = f" +- {self.drop_se:.2f}" if self.drop_se is not None else ""
        return f"accuracy drop {self.accuracy_drop:.2f}{spread} points ({self.images:,} images)"


@dataclass(frozen=True)
class QuantDecision:
    """What shipped, why, and every attempt that led there (for the manifest and the log)."""

    precision: str  # what was shipped: "fp32" when no int8 form passed the guard and paid
    path: Path
    isa: str
    preset: QuantPreset | None
    fp32_top1: float | None
    fp32_latency_ms: float | None
    latency_ms: float | None
    reason: str
    trials: tuple[Trial, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "path": str(self.path), "isa": self.isa,
                "preset": self.preset.to_dict() if self.preset else None, "fp32_top1": self.fp32_top1,
                "fp32_latency_ms": self.fp32_latency_ms, "latency_ms": self.latency_ms, "reason": self.reason,
                "trials": [t.to_dict() for t in self.trials]}


def search_presets(isa: str, precisions: tuple[str, ...], search: bool, calibration_method: str = "auto",
                   transformer: bool = False) -> tuple[tuple[str, QuantPreset, str], ...]:
    """(precision, preset, calibration method) to try: the ISA's defaults with `calibration_method`, or with
    `search` every preset of the ISA, the static ones with every calibration method."""
    chosen = []
    for precision in precisions:
        mode = precision.removeprefix("int8_")
        presets = presets_for(isa, mode, transformer)
        methods = tuple(CALIBRATION_METHODS) if search and mode == "static" else (calibration_method,)
        chosen += [(precision, p, m) for p in (presets if search else presets[:1]) for m in methods]
    return tuple(chosen)


def guarded_quantize(fp32_path: Path, out_path: Path, *, evalset: EvalSet, calibration: np.ndarray,
                     isa: str = "avx2", precisions: tuple[str, ...] = ("int8_static", "int8_dynamic"),
                     guard: GuardConfig = GuardConfig(), search: bool = False,
                     timing: Timing | None = None, latency_source: str = "timed here") -> QuantDecision:
    """Quantize within the accuracy guard and ship the fastest passing form, or fp32 when int8 does not pay.

    Each (precision, preset) is tried; one whose accuracy drop exceeds the guard keeps its most sensitive nodes
    in float and is quantized again, up to `guard.max_rounds` times. `timing(path, precision) -> p50 ms` ranks the
    passing forms against fp32 (without it the first passing form ships); a form it has no figure for (None: e.g.
    the device's latency table says it failed there) does not ship. `latency_source` says where the figures come
    from, for the reason. Everything tried is in `trials`.
    """
    unknown = [p for p in precisions if p not in ("int8_static", "int8_dynamic")]
    if unknown:
        raise EdgekdError(f"the accuracy guard handles int8_static and int8_dynamic, not {', '.join(unknown)}")
    fp32_predictions = onnx_logits(fp32_path, evalset.images).argmax(axis=1)
    fp32_top1 = metrics_from_predictions(fp32_predictions, evalset).top1
    fp32_ms = timing(fp32_path, "fp32") if timing else None
    trials: list[Trial] = []
    best: tuple[Trial, Path] | None = None
    with tempfile.TemporaryDirectory(prefix="edgekd-guard-") as work:
        prepared = prepare_for_quantization(fp32_path, Path(work) / "prepared.onnx", calibration[:8])
        transformer = is_transformer(onnx.load(str(fp32_path), load_external_data=False))
        for index, (precision, preset, method) in enumerate(
                search_presets(isa, precisions, search, guard.calibration_method, transformer)):
            attempt = Path(work) / f"{index}_{preset.name}.onnx"
            rounds = _guarded_rounds(prepared, attempt, precision, preset, isa, evalset, calibration,
                                     replace(guard, calibration_method=method), fp32_predictions, fp32_top1)
            final = rounds[-1]
            if final.passed and timing:
                latency = timing(attempt, precision)
                final = replace(final, latency_ms=latency) if latency is not None else replace(
                    final, passed=False, error=f"no {precision} latency ({latency_source}): it cannot be shown to pay")
                rounds[-1] = final
            trials += rounds
            if final.passed and (best is None or _faster(final, best[0])):
                best = (final, attempt.rename(Path(work) / f"best_{index}.onnx"))
        if best is not None and timing is not None:
            fp32_ms, best = _side_by_side(timing, fp32_path, *best)
        decision = _decide(best, fp32_top1, fp32_ms, isa, out_path, tuple(trials), guard, latency_source)
        quantize_onnx(best[1] if decision.precision != "fp32" and best else fp32_path, out_path, "fp32")
    log.info("quantization: shipped %s (%s)", decision.precision, decision.reason)
    return decision


# The decision times fp32 and the fastest passing int8 form alternately, this many rounds, and compares medians:
# p50s taken minutes apart on a busy machine drift by more than the 5% int8 must gain (a classifier-only dynamic
# int8, no faster by construction, once measured 1.11x that way: benchmarks/results/quantization_host.md).
SIDE_BY_SIDE_ROUNDS = 3


def _side_by_side(timing: Timing, fp32_path: Path, trial: Trial, path: Path) -> tuple[float | None, tuple[Trial, Path]]:
    fp32_times: list[float] = []
    int8_times: list[float] = []
    for _ in range(SIDE_BY_SIDE_ROUNDS):
        fp32_ms, int8_ms = timing(fp32_path, "fp32"), timing(path, trial.precision)
        if fp32_ms is None or int8_ms is None:
            return fp32_ms, (trial, path)
        fp32_times.append(fp32_ms)
        int8_times.append(int8_ms)
    return float(np.median(fp32_times)), (replace(trial, latency_ms=float(np.median(int8_times))), path)


def _faster(candidate: Trial, incumbent: Trial) -> bool:
    if candidate.latency_ms is None or incumbent.latency_ms is None:
        return False
    return candidate.latency_ms < incumbent.latency_ms


def _decide(best: tuple[Trial, Path] | None, fp32_top1: float | None, fp32_ms: float | None, isa: str,
            out_path: Path, trials: tuple[Trial, ...], guard: GuardConfig, latency_source: str) -> QuantDecision:
    min_speedup = guard.min_speedup
    if best is None:
        floor = "" if guard.min_agreement is None else \
            f" and agreed with fp32 on at least {100 * guard.min_agreement:g}% of the images (--min-agreement)"
        return QuantDecision("fp32", out_path, isa, None, fp32_top1, fp32_ms, fp32_ms, trials=trials,
                             reason=f"no int8 form stayed within the accuracy guard{floor}")
    trial = best[0]
    if fp32_ms is not None and trial.latency_ms is not None and trial.latency_ms * min_speedup > fp32_ms:
        return QuantDecision("fp32", out_path, isa, None, fp32_top1, fp32_ms, fp32_ms, trials=trials,
                             reason=f"fastest int8 ({trial.preset.name}, {trial.latency_ms:.2f} ms) is no faster "
                                    f"than fp32 ({fp32_ms:.2f} ms) by the {min_speedup:g}x it must gain "
                                    f"({latency_source})")
    speed = f", {fp32_ms / trial.latency_ms:.2f}x faster than fp32 ({latency_source})" \
        if fp32_ms and trial.latency_ms else ""
    calibrated = f", {trial.calibration_method} calibration" if trial.calibration_method else ""
    if trial.weight_corrections:  # what the file kept of bias correction and learned rounding (correction_check)
        calibrated += f", weight corrections: {trial.weight_corrections}"
    return QuantDecision(trial.precision, out_path, isa, trial.preset, fp32_top1, fp32_ms, trial.latency_ms,
                         trials=trials, reason=f"{trial.preset.name}{calibrated}: {trial.describe_drop()}, "
                                                f"agreement {trial.agreement:.1%}{speed}")


def _guarded_rounds(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str, evalset: EvalSet,
                    calibration: np.ndarray, guard: GuardConfig, fp32_predictions: np.ndarray,
                    fp32_top1: float | None) -> list[Trial]:
    """Quantize, measure, and while the guard fails keep the most sensitive nodes in float and try again; a round
    whose ranked nodes fail also tries that share of the compute nodes nearest the input ("auto" calibration first
    tries each method of AUTO_CALIBRATION, then goes on with the one that lost least)."""
    excluded: tuple[str, ...] = ()
    rounds: list[Trial] = []
    tried: set[tuple[str, ...]] = set()  # input-side sets already measured (a small graph's share repeats)
    method = guard.calibration_method if preset.mode == "static" else None
    if method == "auto":
        method, first = _first_calibration(prepared, target, precision, preset, isa, evalset, calibration, guard,
                                           fp32_predictions, fp32_top1)
        rounds += first
        if first[-1].passed or first[-1].error:
            return rounds
        guard = replace(guard, calibration_method=method)
    for round_index in range(1 if rounds else 0, guard.max_rounds + 1):
        ranked_more = round_index == 0
        if round_index > 0:  # the last round failed: keep more of its most sensitive nodes in float
            more = _more_in_float(prepared, target, precision, preset, isa, calibration, guard, evalset, excluded,
                                  round_index)
            ranked_more, excluded = more != excluded, more
        if ranked_more:
            trial = _attempt(prepared, target, precision, preset, isa, evalset, calibration, guard, excluded,
                             fp32_predictions, fp32_top1, method, round_index, "sensitivity" if round_index else None)
            rounds.append(trial)
            if trial.passed or trial.error:
                break
        near_input = _input_side(prepared, preset, guard, round_index) if round_index > 0 else ()
        if near_input and near_input not in tried:  # nor did the ranked nodes: the compute nodes nearest the input
            tried.add(near_input)
            side = target.with_name(f"{target.stem}.input-side.onnx")
            trial = _attempt(prepared, side, precision, preset, isa, evalset, calibration, guard, near_input,
                             fp32_predictions, fp32_top1, method, round_index, "input side")
            rounds.append(trial)
            if trial.passed:
                side.replace(target)
                break
            side.unlink(missing_ok=True)
        elif not ranked_more:
            break  # neither way has another node to keep in float
    return rounds


# The ranking scores each tensor by the error its own quantization adds, and an early tensor's error is small where it
# is made and grows through every layer after it: on the real Lite0 (152 photo crops, a 3-point guard on agreement)
# four rounds of ranked nodes, up to 38 in float, left agreement at 96.1-96.7%, where the stem and the first
# depthwise conv in float alone give 97.4% (int8_rounding.md). So a round whose ranked nodes fail also tries the
# compute nodes nearest the input, as large a share (5%, 10%, ... of them).
FLOAT_NODE_SOURCES = ("sensitivity", "input side")


def _attempt(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str, evalset: EvalSet,
             calibration: np.ndarray, guard: GuardConfig, excluded: tuple[str, ...], fp32_predictions: np.ndarray,
             fp32_top1: float | None, method: str | None, round_index: int, chosen_by: str | None) -> Trial:
    """Quantize with `excluded` in float and measure it: one trial (with `error` set where it could not be done)."""
    def failed(message: str) -> Trial:
        log.info("quantization %s: %s", preset.name, message)
        return Trial(precision, preset, excluded, None, 0.0, 100.0, False, error=message, calibration_method=method,
                     float_nodes_by=chosen_by)

    try:
        quantize_onnx(prepared, target, precision, isa=isa, calibration=calibration, preset=preset,
                      prepared=True, calibration_method=guard.calibration_method, nodes_to_exclude=excluded)
    except EdgekdError as error:
        return failed(str(error))
    try:
        trial = _measure(target, precision, preset, isa, excluded, evalset, fp32_predictions, fp32_top1, guard)
    except ORT_RUN_ERRORS as error:
        return failed(f"{precision} does not run: {first_line(error, 160)}")
    trial = replace(trial, calibration_method=method, float_nodes_by=chosen_by)
    log.info("quantization %s round %d: %d node(s) in float%s, %s, agreement %.1f%% -> %s", preset.name, round_index,
             len(excluded), f" ({chosen_by})" if chosen_by else "", trial.describe_drop(), 100 * trial.agreement,
             "pass" if trial.passed else "fail")
    return trial


def _input_side(prepared: Path, preset: QuantPreset, guard: GuardConfig, round_index: int) -> tuple[str, ...]:
    """The first compute nodes the preset quantizes, in graph (topological) order: 5% of them for round 1, doubling
    each round."""
    ops = set(preset.op_types or COMPUTE_OPS) & set(COMPUTE_OPS)
    left_float = set(_activation_matmuls(prepared)) if preset.weight_matmuls_only else set()  # float anyway
    compute = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ops and n.name not in left_float]
    return tuple(compute[:max(1, round(len(compute) * guard.first_exclusion * 2 ** (round_index - 1)))])


def _more_in_float(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str,
                   calibration: np.ndarray, guard: GuardConfig, evalset: EvalSet, excluded: tuple[str, ...],
                   round_index: int) -> tuple[str, ...]:
    """`excluded` plus the most sensitive nodes of the failed model at `target`: 5% of the ranked nodes for round 1,
    doubling each round, and the rest of the last tensor's nodes (its producer and readers): a tensor any quantized
    node reads is still quantized."""
    ranked = [s for s in _rank(prepared, target, precision, preset, isa, calibration, guard, excluded,
                               evalset.images[:SENSITIVITY_IMAGES]) if s.added_error > 0]
    count = max(1, round(len(ranked) * guard.first_exclusion * 2 ** (round_index - 1)))
    while 0 < count < len(ranked) and ranked[count].tensor == ranked[count - 1].tensor:
        count += 1
    if ranked:
        log.info("keeping in float: %s", ", ".join(f"{s.name} ({s.added_error:.2g})" for s in ranked[:count]))
    return excluded + tuple(s.name for s in ranked[:count])


def _first_calibration(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str,
                       evalset: EvalSet, calibration: np.ndarray, guard: GuardConfig, fp32_predictions: np.ndarray,
                       fp32_top1: float | None) -> tuple[str, list[Trial]]:
    """Round 0 of "auto" calibration: each method of AUTO_CALIBRATION in turn until one passes. Returns the method
    to go on with (the one that passed, else the one that lost least, its model left at `target`) and the trials."""
    trials: list[Trial] = []
    best: tuple[float, str] | None = None
    for method in AUTO_CALIBRATION:
        trial = _guarded_rounds(prepared, target, precision, preset, isa, evalset, calibration,
                                replace(guard, calibration_method=method, max_rounds=0), fp32_predictions,
                                fp32_top1)[0]
        trials.append(trial)
        if trial.passed or trial.error:
            return method, trials
        if best is None or trial.accuracy_drop < best[0]:
            best = (trial.accuracy_drop, method)
    assert best is not None
    if best[1] != AUTO_CALIBRATION[-1]:  # leave the best method's model at `target`, where sensitivity ranks it
        quantize_onnx(prepared, target, precision, isa=isa, calibration=calibration, preset=preset, prepared=True,
                      calibration_method=best[1])
    return best[1], trials


def _rank(prepared: Path, quantized: Path, precision: str, preset: QuantPreset, isa: str, calibration: np.ndarray,
          guard: GuardConfig, excluded: tuple[str, ...], images: np.ndarray) -> list[NodeSensitivity]:
    """Sensitivity of each node, from a QDQ model (qdq_loss_debug pairs its dequantized tensors with fp32's by name):
    a static QOperator model is ranked through its QDQ twin (same scales); a dynamic one, which computes its
    activation ranges at run time, through a statically calibrated QDQ model of the same op types."""
    if preset.quant_format != "qdq" or preset.mode == "dynamic":
        quantized = quantized.with_name(quantized.stem + ".qdq.onnx")
        twin = replace(preset, quant_format="qdq", mode="static")
        quantize_onnx(prepared, quantized, "int8_static", isa=isa, calibration=calibration, prepared=True,
                      preset=twin, calibration_method=guard.calibration_method, nodes_to_exclude=excluded)
    ranked = rank_sensitive_nodes(prepared, quantized, images, skip=excluded)
    return [s for s in ranked if not preset.op_types or s.op_type in preset.op_types]  # only what it quantized


SENSITIVITY_IMAGES = 32  # enough to rank nodes by the error they add; the guard itself uses the whole set


def _measure(path: Path, precision: str, preset: QuantPreset, isa: str, excluded: tuple[str, ...],
             evalset: EvalSet, fp32_predictions: np.ndarray, fp32_top1: float | None, guard: GuardConfig) -> Trial:
    """The trial's figures as the target's CPU computes them (verify.emulates_target: a file for another kind of CPU
    than this one is measured in float, not in this CPU's int8 kernels)."""
    if emulates_target(path, isa):
        log.info("measuring %s as %s computes it: this CPU's int8 kernels are another kind", path.name, isa)
    predictions = onnx_logits(path, evalset.images, target_isa=isa).argmax(axis=1)
    metrics = metrics_from_predictions(predictions, evalset, reference=fp32_predictions)
    agreement = metrics.agreement if metrics.agreement is not None else 0.0
    drop = guard_drop(fp32_top1, metrics.top1, agreement)
    passed = guard.failure(drop, agreement) is None
    labels = evalset.labels if fp32_top1 is not None else None
    spread = drop_standard_error(fp32_predictions, predictions, labels)
    measured = int((labels >= 0).sum()) if labels is not None else len(predictions)  # what the drop counts
    return Trial(precision, preset, excluded, metrics.top1, agreement, drop, passed, size_bytes=path.stat().st_size,
                 drop_se=round(spread, 6), images=measured, weight_corrections=kept_corrections(path))
