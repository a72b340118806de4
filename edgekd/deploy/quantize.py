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
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_dynamic, quantize_static)
from onnxruntime.quantization.calibrate import HistogramCollector, TensorsData, save_tensors_data

from edgekd.artifacts import atomic_path
from edgekd.errors import EdgekdError, first_line
from edgekd.deploy.correction_check import BOTH, correct_where_it_helps
from edgekd.deploy.entropy_threshold import entropy_threshold
from edgekd.deploy.float_weights import keep_float_weights
from edgekd.deploy.activation_ranges import (RANGE_BATCH, CalibratedTensors, activation_histograms,
                                            averaged_ranges)
from edgekd.deploy.export import check_model, is_transformer, quiet_onnxruntime
from edgekd.select.latency import ORT_RUN_ERRORS
from edgekd.deploy.verify import INPUT_NAME, PARITY_RTOL, onnx_logits

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8_static", "int8_dynamic", "fp16")
ISAS = ("avx2", "avx512", "avx512_vnni", "arm64")
# The one calibration-size policy: int8 static calibrates on a stratified, shuffled sample of CALIBRATION_IMAGES
# training images (every static int8 file edgekd writes: the bundle, `edgekd export`, the teacher's int8 reference);
# fewer than MIN_CALIBRATION_IMAGES gives ranges from a handful of images, clipping on everything else.
CALIBRATION_IMAGES = 256
MIN_CALIBRATION_IMAGES = 32
# "average": each range the mean of the extremes of each batch of AVERAGE_BATCH images, as onnxruntime's MinMax
# calibrator computes it with CalibMovingAverage (activation_ranges.py runs it a few images at a time; the ranges
# TensorFlow's quantization-aware training keeps). Some networks answer a
# few images with activations 100-1,000x the rest's: an 8-epoch EfficientNet-B0 student does so on 5 of its 256
# calibration images (all sandals), and minmax ranges stretched to them round the other images' activations to zero
# (top-1 82.89% -> 9.79%). The histogram methods cannot see that bulk either, their bins spread over the same extremes
# (percentile 9.45%, entropy 9.70% on 2,000 of the images). Averaged ranges clip those images and keep everyone's
# answers: 83.11%, agreement 97.6%, fp32's answer on every test image with such activations
# (benchmarks/results/quantization_host.md, part B, item 4).
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "average": CalibrationMethod.MinMax,
                       "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
AVERAGE_BATCH = 16
PERCENTILE = 99.999  # onnxruntime's default: the share of |x| percentile ranges keep
# "auto" (the guard's default): minmax, and when that loses more than the guard allows, averaged ranges, percentile
# then entropy, before any node is kept in float. Clipping the rare extreme activations is often all a model needs.
AUTO_CALIBRATION = ("minmax", "average", "percentile", "entropy")
CALIBRATION_CHOICES = ("auto", *CALIBRATION_METHODS)
# 16-bit QDQ types are for measuring which half of int8 loses the answers (benchmarks/int8_float_head.py): no preset
# ships them, the CPU provider has no 16-bit kernels and runs those nodes in float.
_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16, "int16": QuantType.QInt16}
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
            shape = _input_chw(check_model(Path(source)))
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
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if node.input[0] not in float_maps or keepdims != 1 or not _means_height_and_width(node, initializers,
                                                                                             overridable):
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
        exclude += activation_matmuls(source)
    if preset.float_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(preset.op_types or ())
    # minmax: onnxruntime's calibrator, which reduces each tensor batch by batch; the other methods' ranges are
    # computed here a few images at a time (activation_ranges.py) and handed to the quantizer as its calibration cache
    reader = ArrayCalibrationReader(images, batch_size=RANGE_BATCH)
    with quiet_onnxruntime(), tempfile.TemporaryDirectory(prefix="edgekd-calibration-") as scratch:
        cache = None if method == "minmax" else _calibration_cache(source, images, preset, method, Path(scratch))
        quantize_static(str(source), str(target), reader, calibration_cache_path=cache,
                        quant_format=_FORMATS[preset.quant_format], op_types_to_quantize=_op_types(preset),
                        per_channel=preset.per_channel, reduce_range=preset.reduce_range,
                        activation_type=_TYPES[preset.activation_type], weight_type=_TYPES[preset.weight_type],
                        nodes_to_exclude=list(exclude), calibrate_method=CALIBRATION_METHODS[method],
                        extra_options=extra)
    kept = keep_float_weights(target)
    if kept:
        log.debug("%d float nodes fed by int8 tensors get their own per-axis dequantization (kept in float)", kept)
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


PERCENTILE_BINS = 2048  # onnxruntime's for percentile calibration


def _calibration_cache(source: Path, images: np.ndarray, preset: QuantPreset, method: str, scratch: Path) -> Path:
    """`method`'s ranges for `source`, written where quantize_static reads a calibration cache.

    average: the mean of each group of AVERAGE_BATCH images' extremes. percentile: onnxruntime's own arithmetic on
    the histograms (99.999th percentile of |x|, held to the values seen). entropy: the window is symmetric about zero;
    each end is then held to the values seen (a ReLU output's window does not reach below 0), so no level is spent
    where no value falls; the search is onnxruntime's, without its Python loops (entropy_threshold.py)."""
    calibration = CALIBRATION_METHODS[method]
    tensors = CalibratedTensors(source, _op_types(preset), scratch)
    if method == "average":
        ranges: dict[str, tuple] = averaged_ranges(tensors, images, AVERAGE_BATCH)
    elif method == "entropy":
        histograms = activation_histograms(tensors, images, calibration, ENTROPY_BINS)
        ranges = {name: (*entropy_threshold(histogram, ENTROPY_LEVELS), *histogram[:2])
                  for name, histogram in histograms.items()}
    else:
        collector = HistogramCollector("percentile", symmetric=True, num_bins=PERCENTILE_BINS,
                                       num_quantized_bins=ENTROPY_LEVELS, percentile=PERCENTILE, scenario="same")
        collector.histogram_dict.update(activation_histograms(tensors, images, calibration, PERCENTILE_BINS))
        ranges = collector.compute_collection_result()
    save_tensors_data(TensorsData(calibration, ranges), scratch / f"{method}.json")
    return scratch / f"{method}.json"


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


def activation_matmuls(path: Path) -> tuple[str, ...]:
    """MatMuls of two activations (attention's Q.K^T and A.V): no weight to quantize, and int8 costs them accuracy."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return tuple(n.name for n in graph.node if n.op_type == "MatMul" and not set(n.input) & weights)


GATES = ("Sigmoid", "HardSigmoid")
SQUEEZE_EXCITE_MAX_NODES = 12  # pool, two 1x1 convs, their activation (SiLU is Sigmoid + Mul), the gate: a few more


def squeeze_excite_nodes(path: Path) -> tuple[str, ...]:
    """The squeeze-excite branches' nodes (MobileNetV3, EfficientNet, RegNetY, ...): from each spatial pool to the
    Sigmoid/HardSigmoid gate that scales the feature map, without the scaling Mul itself. A branch computes on one value
    per channel, so keeping it in float costs little, while one loud channel among its 1x1 activations leaves the
    others a few int8 levels: a 2-epoch MobileNetV3-large student lost 2.32 points as static int8 and 0.15 with these
    in float (benchmarks/results/quantization_host.md, item 4). Found by structure, not by name: walking back from
    each gate over every input, every path must reach the same pool within SQUEEZE_EXCITE_MAX_NODES nodes, and that
    pool must read the map the gate scales. Names as quantize_static's nodes_to_exclude reads them: give the prepared
    graph (prepare_for_quantization names every node)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}
    weights = {init.name: init for init in graph.initializer}
    branches: list[str] = []
    for scale in (n for n in graph.node if n.op_type == "Mul" and len(n.input) == 2):
        for gate_input, scaled in (scale.input, reversed(scale.input)):
            gate = producer.get(gate_input)
            if gate is None or gate.op_type not in GATES:
                continue
            branch, pool = _branch_back_to_pool(gate, producer, weights)
            if pool is not None and pool.input[0] == scaled:  # the gate is computed from the map it scales
                branches += [name for name in branch if name not in branches]
    return tuple(branches)


def _branch_back_to_pool(gate: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                         weights: dict[str, onnx.TensorProto]) -> tuple[list[str], onnx.NodeProto | None]:
    """The nodes from `gate` back to one spatial pool, and that pool; ([], None) where a path leaves the branch (a
    graph input, a second pool, too many nodes: not a squeeze-excite branch)."""
    found: dict[int, onnx.NodeProto] = {}
    pools: list[onnx.NodeProto] = []
    stack = [gate]
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        found[id(node)] = node
        if len(found) > SQUEEZE_EXCITE_MAX_NODES:
            return [], None
        if _spatial_pool(node, weights):
            pools.append(node)
            continue
        for name in node.input:
            if name in producer:
                stack.append(producer[name])
            elif name and name not in weights:
                return [], None  # a graph input reached without passing a pool
    if len(pools) != 1:
        return [], None
    return [node.name for node in found.values() if node.op_type != "Constant"], pools[0]


def _spatial_pool(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    """A mean over height and width: GlobalAveragePool, or such a ReduceMean (a mean over channels, as
    spatial-attention gates take, is not a squeeze)."""
    return node.op_type == "GlobalAveragePool" or (node.op_type == "ReduceMean"
                                                   and _means_height_and_width(node, weights, set()))


def _means_height_and_width(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto],
                            overridable: set[str]) -> bool:
    """A ReduceMean whose axes are 2 and 3 of an N x C x H x W map: an attribute up to opset 17, the optional second
    input from opset 18 (an initializer a caller cannot override)."""
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if len(node.input) > 1 and node.input[1]:
        axes = None if node.input[1] not in initializers or node.input[1] in overridable else \
            np.atleast_1d(onnx.numpy_helper.to_array(initializers[node.input[1]])).tolist()
    return bool(axes) and all(-4 <= int(a) < 4 for a in axes) and sorted(int(a) % 4 for a in axes) == [2, 3]


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
