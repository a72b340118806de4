"""The torch-free predictor: same pixels as timm's eval transform, same answers as PyTorch, even without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.deploy.bundle import BundleOptions, bundle_from_checkpoint, preprocess_json
from edgekd.data import eval_transform
from edgekd.runtime import BundleError, ImagePreprocessor, Predictor
from edgekd.distill.students import load_student, read_student_checkpoint
from edgekd.types import Preprocess
from tests.helpers.tiny_students import tiny_student

RUNTIME_FILE = Path(__file__).resolve().parent.parent / "edgekd" / "runtime.py"


@pytest.fixture(scope="module")
def bundle(small_fmnist, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An fp32 bundle of a trained tiny ResNet (no data given: fp32 ships) and the PyTorch model it came from."""
    checkpoint = read_student_checkpoint(tiny_student("test_resnet", small_fmnist))
    out = tmp_path_factory.mktemp("runtime") / "bundle"
    bundle_from_checkpoint(checkpoint, out, None, BundleOptions())
    return out, load_student(checkpoint)


def _torch_top1(model: torch.nn.Module, pre: Preprocess, images: list[Image.Image]) -> list[int]:
    transform = eval_transform(pre)
    with torch.no_grad():
        return model(torch.stack([transform(image) for image in images])).argmax(1).tolist()


@pytest.mark.parametrize("pre", [
    Preprocess((3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875),
    Preprocess((1, 40, 40), (0.5,), (0.5,), "bilinear", 1.0),
    Preprocess((3, 24, 24), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 0.95, "squash"),
    Preprocess((3, 36, 36), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "nearest", 1.2),  # crop larger than the resize: pads
])
def test_preprocessing_matches_eval_transform(pre: Preprocess, small_fmnist) -> None:
    preprocess = ImagePreprocessor(preprocess_json(pre, ()))
    rng = np.random.default_rng(0)
    images = [small_fmnist.val[i][0] for i in range(8)] + [  # real 28x28 grayscale, and odd-shaped colour images
        Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (61, 29, 3), dtype=np.uint8))]
    transform = eval_transform(pre)
    for image in images:
        np.testing.assert_allclose(preprocess(image), transform(image).numpy(), atol=1e-6)


def test_predictor_agrees_with_pytorch(bundle, small_fmnist, tmp_path: Path) -> None:
    folder, model = bundle
    predictor = Predictor(folder)
    images = [small_fmnist.val[i][0] for i in range(60)]
    expected = _torch_top1(model, read_student_checkpoint(tiny_student("test_resnet", small_fmnist)).preprocess,
                           images)
    ranked = predictor.predict_batch(images, top_k=3)
    labels = list(small_fmnist.info.class_names)
    assert [labels.index(top[0][0]) for top in ranked] == expected
    assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and 0 < sum(p for _, p in top) <= 1.0 + 1e-6
               for top in ranked)
    path = tmp_path / "one.png"
    images[0].save(path)
    assert predictor.predict(path, top_k=1)[0][0] == labels[expected[0]]
    # pixels an app already holds: the same answer as the file
    assert predictor.predict(np.asarray(images[0]), top_k=3) == predictor.predict(path, top_k=3)
    assert predictor.predict(np.asarray(images[0].convert("RGB")), top_k=1)[0][0] == labels[expected[0]]
    for wrong in (np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 2), np.uint8), 7, np.zeros((0, 0, 3), np.uint8)):
        with pytest.raises(BundleError, match="cannot"):
            predictor.predict(wrong)
    with pytest.raises(BundleError, match="at least 1 label"):  # as `edgekd predict --top-k 0`
        predictor.predict(path, top_k=0)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="cannot load"):
        Predictor(broken)


def test_predictor_in_a_fresh_venv_without_torch(bundle, small_fmnist, tmp_path: Path) -> None:
    """An app's environment: python -m venv + pip install onnxruntime numpy pillow, and runtime.py on its own."""
    folder, model = bundle
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "onnxruntime", "numpy", "pillow"], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(RUNTIME_FILE, app / "runtime.py")  # what an app copies: one file
    images = [small_fmnist.val[i][0] for i in range(40)]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(app / f"{index}.png"))
        image.save(paths[-1])
    script = textwrap.dedent("""
        import json, sys
        from runtime import Predictor
        predictor = Predictor(sys.argv[1])
        labels = [predictor.predict(path, top_k=1)[0][0] for path in sys.argv[2:]]
        print(json.dumps({"labels": labels, "torch_loaded": "torch" in sys.modules}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(python), "-c", script, str(folder), *paths], capture_output=True, text=True, cwd=app,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    torch_check = subprocess.run([str(python), "-c", "import torch"], capture_output=True, env=env)
    assert torch_check.returncode != 0 and not result["torch_loaded"]  # torch really is absent there
    expected = _torch_top1(model, read_student_checkpoint(tiny_student("test_resnet", small_fmnist)).preprocess,
                           images)
    labels = list(small_fmnist.info.class_names)
    assert [labels.index(label) for label in result["labels"]] == expected
