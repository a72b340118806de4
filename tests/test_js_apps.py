"""The bundle in JavaScript apps, on real photographs: in Node.js (onnxruntime-node from npm) the shipped
predict.mjs and an app that knows only the raw-image contract, in headless Chromium (Debian's) the shipped web page
running onnxruntime-web, all give the Python runtime's answers."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from timm.data import ImageNetInfo

from edgekd.deploy.bundle import APP_FILES, APPS, BundleOptions, bundle_from_checkpoint, preprocess_json
from edgekd.deploy.export import export_onnx
from edgekd.deploy.guard import FUSED_ATTENTION
from edgekd.distill.students import read_student_checkpoint
from edgekd.lite_weights import timm_state_dict
from edgekd.models import create_model, preprocess_for
from edgekd.deploy.raw_input import RAW_MODEL_NAME, with_preprocessing
from edgekd.runtime import MODEL_NAME, PREPROCESS_NAME, Predictor, as_model_pixels, read_image
from tests.helpers.node import NODE, app_folder, node
from tests.helpers.photos import crops
from tests.helpers.tiny_students import tiny_student
from tests.helpers.user_images import write_user_images

CHROMIUM = shutil.which("chromium")  # Debian's package; .ci/run installs it

pytestmark = pytest.mark.skipif(NODE is None, reason="this machine has no Node.js")


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """The real ImageNet Lite0 as a bundle an app embeds (raw-image model, predict.mjs, node_modules), and real
    photographs as PNG and as JPEG files."""
    model = create_model("tf_efficientnet_lite0", 1000)
    model.load_state_dict(timm_state_dict("tf_efficientnet_lite0"))
    pre = preprocess_for(model.eval())
    folder = tmp_path_factory.mktemp("app")
    export_onnx(model, folder / MODEL_NAME, pre.input_size)
    config = preprocess_json(pre, tuple(ImageNetInfo().index_to_description(i) for i in range(1000)))
    (folder / PREPROCESS_NAME).write_text(json.dumps(config))
    with_preprocessing(folder / MODEL_NAME, config, folder / RAW_MODEL_NAME)
    for name, template in APP_FILES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(APPS / template, folder / name)
    app_folder(folder, folder, "contract.mjs", "browser.mjs", "decode.mjs")
    photos = tmp_path_factory.mktemp("photos")
    pngs, jpegs = [], []
    for index, picture in enumerate(crops(2, seed=11)):
        pngs.append(photos / f"{index}.png")
        picture.save(pngs[-1])
        jpegs.append(photos / f"{index}.jpg")
        picture.save(jpegs[-1], quality=95)
    return folder, pngs, jpegs


def test_predict_mjs_gives_the_python_runtime_s_answers(app):
    folder, pngs, jpegs = app
    python = Predictor(folder)
    answers = node(folder / "predict.mjs", *pngs, *jpegs, "--top-k", "3")
    assert [a["file"] for a in answers] == [str(p) for p in pngs + jpegs]
    assert all(len(a["top"]) == 3 and a["top"][0][1] >= a["top"][1][1] for a in answers)
    top1 = {a["file"]: a["top"][0][0] for a in answers}
    same_png = [top1[str(p)] == python.predict(p, 1)[0][0] for p in pngs]
    same_jpeg = [top1[str(p)] == python.predict(p, 1)[0][0] for p in jpegs]
    assert all(same_png), same_png  # lossless: the very pixels Python decodes
    # JPEG: jpeg-js and libjpeg decode a few levels apart on some pixels; near-ties among 1000 classes may flip
    assert sum(same_jpeg) >= 0.9 * len(jpegs), same_jpeg


@pytest.fixture(scope="module")
def user_images(tmp_path_factory):
    return write_user_images(tmp_path_factory.mktemp("user-images"))


def test_predict_mjs_reads_user_images_as_the_python_runtime_does(app, user_images):
    """EXIF-turned phone photos, transparency on white, 16-bit and palette PNGs, CMYK JPEGs: the same pixels."""
    folder, _, _ = app
    paths = {kind: image.path for kind, image in user_images.items()}
    for kind, decoded in zip(paths, node(folder / "decode.mjs", *paths.values())):
        expected = np.asarray(as_model_pixels(read_image(paths[kind]), "RGB"))
        pixels = np.frombuffer(base64.b64decode(decoded["rgb"]), np.uint8)
        pixels = pixels.reshape(decoded["height"], decoded["width"], 3)
        assert pixels.shape == expected.shape, kind
        difference = np.abs(pixels.astype(np.float64) - expected).mean()
        # PNG is lossless: the same bytes. JPEG decoders differ by a level or two on some pixels.
        assert difference <= (2.0 if paths[kind].suffix == ".jpg" else 0.0), f"{kind}: {difference:.2f} levels"


def test_predict_mjs_runs_from_a_linked_folder_and_refuses_what_is_not_an_image(app, tmp_path):
    folder, pngs, _ = app
    (tmp_path / "linked").symlink_to(folder)
    assert len(node(tmp_path / "linked" / "predict.mjs", pngs[0])) == 1
    (tmp_path / "notes.txt").write_text("not a picture")
    done = subprocess.run([NODE, str(folder / "predict.mjs"), str(tmp_path / "notes.txt")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "not a PNG or JPEG image" in done.stderr and "at " not in done.stderr


def test_an_app_that_knows_only_the_contract(app, tmp_path):
    folder, pngs, _ = app
    python = Predictor(folder)
    expected = [python.predict(p, 1)[0][0] for p in pngs]
    script = folder / "contract.mjs"
    answers = node(script, folder / RAW_MODEL_NAME, folder / PREPROCESS_NAME, *pngs)
    assert [a["label"] for a in answers] == expected
    # and it would notice a raw-image model whose preprocessing disagrees with Python's
    config = {**json.loads((folder / PREPROCESS_NAME).read_text()), "interpolation": "nearest",
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    wrong = with_preprocessing(folder / MODEL_NAME, config, folder / "wrong.onnx")
    answers = node(script, wrong, folder / PREPROCESS_NAME, *pngs)
    assert [a["label"] for a in answers] != expected


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.mark.skipif(CHROMIUM is None, reason="this machine has no Chromium")
def test_the_web_page_classifies_chosen_images_like_python(app, user_images, tmp_path):
    folder, pngs, _ = app
    python = Predictor(folder)
    phone, cutout = user_images["exif"], user_images["rgba"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web/index.html"
        shot = tmp_path / "page.png"
        lines = node(folder / "browser.mjs", url, shot, *pngs[:6], cutout.path, phone.path)
    finally:
        server.shutdown()
    answers, shown = lines[:-1], lines[-1]
    assert [a["label"] for a in answers[:7]] == [python.predict(p, 1)[0][0] for p in [*pngs[:6], cutout.path]]
    # the cut-out on white, not on the green its transparent pixels hide: Python's probability
    assert abs(answers[6]["probability"] - python.predict(cutout.path, 1)[0][1]) < 0.02
    # the phone photo turned upright by its EXIF orientation, as Python turns it
    assert (answers[7]["height"], answers[7]["width"]) == phone.shown.shape[:2]
    assert shown["image_width"] > 0 and shown["labels"] == 5  # the page shows the picture and its top labels
    assert shot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def fused_vit_app(small_fmnist, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A ViT student's bundle whose dynamic int8 quantized its attention-fused graph (com.microsoft QAttention,
    attention_fusion.py), as an app embeds it, and Fashion-MNIST test images as PNG files."""
    checkpoint = read_student_checkpoint(tiny_student("test_vit", small_fmnist))
    options = BundleOptions(precisions=("int8_dynamic",), time_models=False, validation_images=200)
    bundle = tmp_path_factory.mktemp("vit") / "bundle"
    result = bundle_from_checkpoint(checkpoint, bundle, small_fmnist, options)
    assert result.precision == "int8_dynamic" and result.decision.preset.name.endswith(FUSED_ATTENTION)
    assert "QAttention" in {node.op_type for node in onnx.load(str(bundle / MODEL_NAME)).graph.node}
    folder = app_folder(bundle, bundle.with_name("app"), "browser.mjs")
    pngs = []
    for index in range(8):
        pngs.append(folder.with_name(f"{index}.png"))
        small_fmnist.val[index][0].save(pngs[-1])
    return folder, pngs


def _clear_answers(python: Predictor, pngs: list[Path]) -> dict[str, str]:
    """Python's top-1 for each image whose top two classes are 0.05 apart or more (a near-tie may flip between
    onnxruntime builds: wasm's int8 kernels are not the native ones)."""
    answers = {str(p): python.predict(p, 2) for p in pngs}
    return {file: top[0][0] for file, top in answers.items() if top[0][1] - top[1][1] >= 0.05}


def test_fused_int8_attention_runs_in_node_and_the_browser(fused_vit_app, tmp_path):
    """The contrib ops of the fused form run in onnxruntime-node and in onnxruntime-web's wasm build, with Python's
    answers."""
    folder, pngs = fused_vit_app
    expected = _clear_answers(Predictor(folder), pngs)
    assert len(expected) >= len(pngs) // 2  # enough clear answers for the comparison to mean something
    in_node = {a["file"]: a["top"][0][0] for a in node(folder / "predict.mjs", *pngs)}
    assert {file: in_node[file] for file in expected} == expected
    if CHROMIUM is None:
        return  # Node alone on a machine without Chromium
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web/index.html"
        lines = node(folder / "browser.mjs", url, tmp_path / "page.png", *pngs)
    finally:
        server.shutdown()
    in_browser = {a["file"]: a["label"] for a in lines[:-1]}
    assert {file: in_browser[file] for file in expected} == expected
