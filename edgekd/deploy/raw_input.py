"""model_with_preprocessing.onnx: one RGB image as uint8 [height, width, 3] in, class probabilities [1, classes] out.

The bundle's preprocess.json (timm's eval transform: resize the shorter side to size / crop_pct, centre crop, scale,
normalise, NCHW) becomes standard ONNX operators in front of the shipped model, and a Softmax behind it, so an app
in any language hands over decoded pixels and reads probabilities: nothing to re-implement, so nothing to get
subtly wrong. Opset 18, for Resize's `antialias`: PIL (what timm's transform and edgekd.runtime run) filters over
the whole footprint of each output pixel when it shrinks an image, and without it a photo shrunk 10x in-graph is
aliased where PIL's is smooth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, version_converter
from PIL import Image

from edgekd.artifacts import atomic_path
from edgekd.errors import EdgekdError
from edgekd.deploy.verify import INPUT_NAME, OUTPUT_NAME

RAW_MODEL_NAME = "model_with_preprocessing.onnx"
RAW_INPUT_NAME = "image"
PROBABILITIES_NAME = "probabilities"
OPSET = 18
# preprocess.json interpolation -> ONNX Resize mode and cubic coefficient (PIL's bicubic uses a = -0.5).
_RESIZE_MODES = {"nearest": ("nearest", None), "bilinear": ("linear", None), "bicubic": ("cubic", -0.5)}
# PIL's RGB -> L weights (ITU-R 601-2 luma), for single-channel models.
_LUMA = (0.299, 0.587, 0.114)


def with_preprocessing(model_path: Path, config: dict[str, Any], out_path: Path) -> Path:
    """Write `model_path` (N x C x H x W float in, N x classes logits out) behind the in-graph preprocessing of
    `config` (preprocess.json) and ahead of a Softmax, whole or not at all."""
    model = onnx.load(str(model_path))
    if _default_opset(model) < OPSET:
        model = version_converter.convert_version(model, OPSET)
    graph = model.graph
    if [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}] != [INPUT_NAME] or \
            [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise EdgekdError(f"{model_path} does not take {INPUT_NAME!r} and give {OUTPUT_NAME!r}; export it with edgekd")
    nodes, initializers = _preprocessing_nodes(config)
    model_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + model_nodes)  # the preprocessing computes the tensor the model reads ("input")
    graph.initializer.extend(initializers)
    graph.node.append(helper.make_node("Softmax", [OUTPUT_NAME], [PROBABILITIES_NAME], axis=1, name="probabilities"))
    classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    del graph.input[:]
    graph.input.append(_image_input())
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT, [1, classes or None]))
    onnx.checker.check_model(model)
    with atomic_path(Path(out_path)) as tmp:
        onnx.save(model, str(tmp))
    return Path(out_path)


def preprocessing_model(config: dict[str, Any]) -> onnx.ModelProto:
    """The in-graph preprocessing alone: uint8 [H, W, 3] "image" -> float [1, C, h, w] "input" (for checking it)."""
    nodes, initializers = _preprocessing_nodes(config)
    graph = helper.make_graph(nodes, "edgekd_preprocessing", [_image_input()],
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _image_input() -> onnx.ValueInfoProto:
    """The raw-image model's input: one RGB image as uint8, any height and width."""
    return helper.make_tensor_value_info(RAW_INPUT_NAME, TensorProto.UINT8, ["height", "width", 3])


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _preprocessing_nodes(config: dict[str, Any]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """uint8 [H, W, 3] "image" -> float [1, C, h, w] "input", as edgekd.runtime.ImagePreprocessor computes it."""
    channels, height, width = (int(v) for v in config["input_size"])
    crop_pct = float(config.get("crop_pct", 1.0))
    interpolation = config.get("interpolation", "bilinear")
    if interpolation not in _RESIZE_MODES:
        raise EdgekdError(f"interpolation {interpolation!r} has no ONNX Resize equivalent; the raw-image model "
                          f"supports {', '.join(_RESIZE_MODES)}")
    if crop_pct > 1.0:
        raise EdgekdError(f"crop_pct {crop_pct} > 1 pads the image before cropping, which the raw-image model does "
                          "not do; use a crop_pct of at most 1")
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    mean = np.asarray(config["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config["std"], np.float32).reshape(1, -1, 1, 1)
    constants = {
        "pre_luma": np.asarray(_LUMA, np.float32).reshape(3, 1),
        "pre_mean": mean, "pre_std": std,
        "pre_zero": np.asarray(0.0, np.float32), "pre_255": np.asarray(255.0, np.float32),
        "pre_half": np.asarray(0.5, np.float32),
        "pre_axis0": np.asarray([0], np.int64),
        "pre_lead": np.asarray([1, channels], np.int64), "pre_crop": np.asarray([height, width], np.int64),
        "pre_axes": np.asarray([2, 3], np.int64), "pre_two": np.asarray(2.0, np.float64),
        "pre_squash": np.asarray([scale_h, scale_w], np.int64),
        "pre_side": np.asarray(float(scale_h), np.float64),
    }
    nodes = [helper.make_node("Cast", [RAW_INPUT_NAME], ["pre_float"], to=TensorProto.FLOAT)]
    pixels = "pre_float"
    if channels == 1:  # PIL's convert("L"): weighted sum, rounded to uint8
        nodes += [helper.make_node("MatMul", [pixels, "pre_luma"], ["pre_luma_raw"]),
                  helper.make_node("Add", ["pre_luma_raw", "pre_half"], ["pre_luma_half"]),
                  helper.make_node("Floor", ["pre_luma_half"], ["pre_gray"])]
        pixels = "pre_gray"
    nodes += [helper.make_node("Transpose", [pixels], ["pre_chw"], perm=[2, 0, 1]),
              helper.make_node("Unsqueeze", ["pre_chw", "pre_axis0"], ["pre_nchw"])]
    if config.get("crop_mode", "center") == "squash" or scale_h != scale_w:
        sizes = "pre_squash"
    else:
        nodes += _shorter_side_sizes()
        sizes = "pre_resized_hw"
    mode, cubic_a = _RESIZE_MODES[interpolation]
    # Pillow samples at pixel centres: half_pixel for the filters, and for nearest the source pixel floor((x + 0.5) /
    # scale), which is ONNX's tf_half_pixel_for_nn with floor
    resize = {"mode": mode, "antialias": 1 if mode != "nearest" else 0, "nearest_mode": "floor",
              "coordinate_transformation_mode": "half_pixel" if mode != "nearest" else "tf_half_pixel_for_nn",
              "exclude_outside": 1 if mode == "cubic" else 0}
    if cubic_a is not None:
        resize["cubic_coeff_a"] = cubic_a
    nodes += [
        # PIL resizes in two passes, width then height, each rounded and clipped to uint8: so does the graph
        helper.make_node("Shape", ["pre_nchw"], ["pre_input_h"], start=2, end=3),
        helper.make_node("Split", [sizes], ["pre_new_h", "pre_new_w"], axis=0, num_outputs=2),
        helper.make_node("Concat", ["pre_lead", "pre_input_h", "pre_new_w"], ["pre_sizes_w"], axis=0),
        helper.make_node("Resize", ["pre_nchw", "", "", "pre_sizes_w"], ["pre_wide_raw"], **resize),
        helper.make_node("Round", ["pre_wide_raw"], ["pre_wide_round"]),
        helper.make_node("Clip", ["pre_wide_round", "pre_zero", "pre_255"], ["pre_wide"]),
        helper.make_node("Concat", ["pre_lead", sizes], ["pre_sizes"], axis=0),
        helper.make_node("Resize", ["pre_wide", "", "", "pre_sizes"], ["pre_resized_raw"], **resize),
        helper.make_node("Round", ["pre_resized_raw"], ["pre_resized_round"]),
        helper.make_node("Clip", ["pre_resized_round", "pre_zero", "pre_255"], ["pre_resized"]),
        # torchvision CenterCrop: top = round((h - crop_h) / 2), Python's round (half to even), as ONNX Round
        helper.make_node("Shape", ["pre_resized"], ["pre_resized_shape"], start=2, end=4),
        helper.make_node("Sub", ["pre_resized_shape", "pre_crop"], ["pre_margin"]),
        helper.make_node("Cast", ["pre_margin"], ["pre_margin_f"], to=TensorProto.DOUBLE),
        helper.make_node("Div", ["pre_margin_f", "pre_two"], ["pre_half_margin"]),
        helper.make_node("Round", ["pre_half_margin"], ["pre_offset_f"]),
        helper.make_node("Cast", ["pre_offset_f"], ["pre_offset"], to=TensorProto.INT64),
        helper.make_node("Add", ["pre_offset", "pre_crop"], ["pre_end"]),
        helper.make_node("Slice", ["pre_resized", "pre_offset", "pre_end", "pre_axes"], ["pre_cropped"]),
        # (x / 255 - mean) / std in float32, in the runtime's order: bit-identical inputs, so an int8 model's first
        # QuantizeLinear rounds exactly as it does there (a fused multiply-add flipped 1.5% of a tiny int8 ResNet's
        # answers on Fashion-MNIST)
        helper.make_node("Div", ["pre_cropped", "pre_255"], ["pre_unit"]),
        helper.make_node("Sub", ["pre_unit", "pre_mean"], ["pre_centred"]),
        helper.make_node("Div", ["pre_centred", "pre_std"], [INPUT_NAME]),
    ]
    used = {name for node in nodes for name in node.input}
    return nodes, [numpy_helper.from_array(value, name) for name, value in constants.items() if name in used]


def _shorter_side_sizes() -> list[onnx.NodeProto]:
    """torchvision Resize(int): the shorter side becomes `side`, the longer int(side * long / short), in float64 as
    Python computes it -> "pre_resized_hw" (int64 [2])."""
    return [
        helper.make_node("Shape", [RAW_INPUT_NAME], ["pre_hw"], start=0, end=2),
        helper.make_node("Cast", ["pre_hw"], ["pre_hw_f"], to=TensorProto.DOUBLE),
        helper.make_node("ReduceMin", ["pre_hw_f"], ["pre_short"], keepdims=1),
        helper.make_node("Mul", ["pre_hw_f", "pre_side"], ["pre_side_times_hw"]),  # side * long first, as Python
        helper.make_node("Div", ["pre_side_times_hw", "pre_short"], ["pre_scaled_hw"]),
        helper.make_node("Floor", ["pre_scaled_hw"], ["pre_floor_hw"]),
        helper.make_node("Cast", ["pre_floor_hw"], ["pre_resized_hw"], to=TensorProto.INT64),
    ]


MIN_AGREEMENT = 0.99  # top-1 equal to edgekd.runtime.Predictor's on at least this share of images, or not written
# Two classes the Python runtime scores within this much probability of each other are a tie: which one an image
# gets is decided by one level of a resized pixel, so a different pick between them is not a disagreement. An int8
# model moves further on such a level than a float one: its first QuantizeLinear turns a level into a whole step. On
# the tiny int8 test ResNet (200 Fashion-MNIST images, probabilities from Pillow's pixels vs the graph's), the largest
# class-probability move per image was 0.005 at the median, 0.02 at the 90th percentile and 0.044 at most.
TIE_MARGIN = 0.02
INT8_TIE_MARGIN = 0.05


def tie_margin(precision: str) -> float:
    """The tie margin for a bundle whose model.onnx is `precision`."""
    return INT8_TIE_MARGIN if precision.startswith("int8") else TIE_MARGIN


@dataclass(frozen=True)
class RawInputCheck:
    """The raw-image model against the Python runtime (edgekd.runtime.Predictor) on the same images."""

    images: int
    top1_agreement: float  # the same top-1 as the Python runtime, or one it scores within tie_margin of its own
    max_probability_diff: float
    source: str  # which images: "validation images" or "synthetic images" (a bundle made without data)
    tie_margin: float = TIE_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_with_preprocessing(raw_path: Path, bundle_dir: Path, images: Sequence[Image.Image], source: str, *,
                             margin: float = TIE_MARGIN) -> RawInputCheck:
    """Run every image through the raw-image model and through the bundle's Python runtime; compare, counting a
    different pick within `margin` (tie_margin) of the runtime's top probability as the same answer."""
    from edgekd.runtime import Predictor, as_model_pixels

    predictor = Predictor(bundle_dir)
    session = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
    same, worst = 0, 0.0
    for image in images:
        expected = predictor.probabilities([image])[0]
        actual = session.run(None, {RAW_INPUT_NAME: np.asarray(as_model_pixels(image, "RGB"))})[0][0]
        same += int(expected.max() - expected[actual.argmax()] <= margin)
        worst = max(worst, float(np.abs(actual - expected).max()))
    return RawInputCheck(len(images), same / max(1, len(images)), worst, source, margin)


def synthetic_images(count: int = 32, seed: int = 0) -> list[Image.Image]:
    """Smooth random pictures of assorted sizes and aspects, for checking a bundle made without data."""
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        size = (int(rng.integers(48, 400)), int(rng.integers(48, 400)))
        pictures.append(Image.fromarray(grid).resize(size, Image.Resampling.BILINEAR))
    return pictures
