"""model_with_preprocessing.onnx: raw RGB bytes in, probabilities out, equal to the Python runtime's answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgekd.deploy.bundle import BundleOptions, bundle_from_checkpoint, preprocess_json
from edgekd.deploy.export import export_onnx
from edgekd.lite_weights import timm_state_dict
from edgekd.models import create_model, preprocess_for
from edgekd.deploy.raw_input import (
    MIN_AGREEMENT,
    RAW_INPUT_NAME,
    RAW_MODEL_NAME,
    check_with_preprocessing,
    preprocessing_model,
    with_preprocessing,
)
from edgekd.runtime import MODEL_NAME, PREPROCESS_NAME, ImagePreprocessor
from edgekd.distill.students import read_student_checkpoint
from tests.helpers.mobile import assert_mobile_form_agrees
from tests.helpers.photos import crops
from tests.helpers.tiny_students import tiny_student


def run_raw(path: Path, image) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {RAW_INPUT_NAME: np.asarray(image.convert("RGB"))})[0]


@pytest.mark.parametrize("name, precision", [("test_resnet", "int8_static"), ("test_vit", "fp32")])
def test_bundle_ships_a_raw_image_model_that_answers_like_python(name, precision, small_fmnist, tmp_path):
    checkpoint = read_student_checkpoint(tiny_student(name, small_fmnist))
    options = BundleOptions(precisions=(precision,) if precision != "fp32" else (), time_models=False,
                            ort_format=True, validation_images=200)
    result = bundle_from_checkpoint(checkpoint, tmp_path / "bundle", small_fmnist, options)
    assert result.precision == precision
    raw = tmp_path / "bundle" / RAW_MODEL_NAME
    graph = onnx.load(str(raw)).graph
    assert [i.name for i in graph.input] == [RAW_INPUT_NAME]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # standard operators only: no custom ops
    manifest = {entry["path"]: entry for entry in json.loads((tmp_path / "bundle" / "manifest.json").read_text())}
    figures = manifest[RAW_MODEL_NAME]["metrics"]["against_python_runtime"]
    assert figures["images"] == 200 and figures["top1_agreement"] >= MIN_AGREEMENT
    feeds = []
    for image, _ in (small_fmnist.val[i] for i in range(5)):  # any size: a 28x28 record and a big upscaled one
        for picture in (image, image.resize((301, 187))):
            probabilities = run_raw(raw, picture)
            assert probabilities.shape == (1, small_fmnist.info.num_classes)
            assert abs(float(probabilities.sum()) - 1.0) < 1e-4
            feeds.append({RAW_INPUT_NAME: np.asarray(picture.convert("RGB"))})
    assert_mobile_form_agrees(raw.with_suffix(".ort"), raw, feeds)  # onnxruntime-mobile's format


# Share of pixel values away from Pillow's. Bilinear shrinking: up to 2.7% of a photo's values, one level; nearest:
# up to 1.9%, where float32 source coordinates land on a neighbouring pixel (Pillow computes them in double). The
# README quotes these bounds.
OFF_BY_A_LEVEL = {"bicubic": 0.005, "nearest": 0.03, "bilinear": 0.05}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("channels", [3, 1])
def test_in_graph_preprocessing_gives_the_runtime_s_pixels(interpolation, channels, small_fmnist):
    """Real photos shrunk from 300-1000 px and 28 px Fashion-MNIST records enlarged: within a level of what
    edgekd.runtime (Pillow) computes, but for a share of pixels (OFF_BY_A_LEVEL)."""
    mean, std = [0.485, 0.456, 0.406][:channels], [0.229, 0.224, 0.225][:channels]
    config = {"input_size": [channels, 96, 96], "mean": mean, "std": std, "interpolation": interpolation,
              "crop_pct": 0.875, "crop_mode": "center"}
    session = ort.InferenceSession(preprocessing_model(config).SerializeToString(), providers=["CPUExecutionProvider"])
    runtime = ImagePreprocessor(config)
    levels = np.asarray(std, np.float32).reshape(-1, 1, 1) * 255
    for picture in crops(1, seed=4) + [small_fmnist.val[i][0] for i in range(8)]:
        graph = session.run(None, {RAW_INPUT_NAME: np.asarray(picture.convert("RGB"))})[0][0]
        off = np.abs(graph - runtime(picture)) * levels  # in 0-255 levels
        assert graph.shape == (channels, 96, 96)
        assert (off > 0.5).mean() < OFF_BY_A_LEVEL[interpolation], (picture.size, (off > 0.5).mean(), off.max())
        if interpolation != "nearest":  # nearest takes a neighbouring source pixel instead: any size of difference
            assert np.percentile(off, 99.9) <= 2.0, (picture.size, off.max())


@pytest.fixture(scope="module")
def lite0_bundle(tmp_path_factory) -> Path:
    """The real ImageNet Lite0 as a bundle folder (model.onnx + preprocess.json): real photos, real downscaling."""
    model = create_model("tf_efficientnet_lite0", 1000)
    model.load_state_dict(timm_state_dict("tf_efficientnet_lite0"))
    pre = preprocess_for(model.eval())
    folder = tmp_path_factory.mktemp("lite0")
    export_onnx(model, folder / MODEL_NAME, pre.input_size)
    (folder / PREPROCESS_NAME).write_text(json.dumps(preprocess_json(pre, tuple(str(i) for i in range(1000)))))
    return folder


def test_real_photos_shrunk_in_graph_match_pil(lite0_bundle):
    """Photos of 300-1000 px shrunk to 224: Resize with antialias, as PIL filters, so the answers match."""
    config = json.loads((lite0_bundle / PREPROCESS_NAME).read_text())
    raw = with_preprocessing(lite0_bundle / MODEL_NAME, config, lite0_bundle / RAW_MODEL_NAME)
    check = check_with_preprocessing(raw, lite0_bundle, crops(4, seed=5), "photos")
    assert check.images == 76 and check.top1_agreement >= MIN_AGREEMENT, check


def test_a_preprocessing_that_differs_from_python_is_caught(lite0_bundle, tmp_path):
    """The check is not blind: the same model with another normalisation or interpolation disagrees."""
    config = json.loads((lite0_bundle / PREPROCESS_NAME).read_text())
    photos = crops(2, seed=6)
    right = check_with_preprocessing(with_preprocessing(lite0_bundle / MODEL_NAME, config, tmp_path / "right.onnx"),
                                     lite0_bundle, photos, "photos")
    assert config["mean"] == [0.5, 0.5, 0.5]  # Lite0's own: the first wrong one below is ImageNet's usual
    for wrong_config in ({**config, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                         {**config, "interpolation": "nearest"}):
        wrong = check_with_preprocessing(with_preprocessing(lite0_bundle / MODEL_NAME, wrong_config,
                                                            tmp_path / "wrong.onnx"), lite0_bundle, photos, "photos")
        assert wrong.top1_agreement < right.top1_agreement and wrong.top1_agreement < MIN_AGREEMENT, wrong
