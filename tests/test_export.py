"""Export: real timm students trained on real Fashion-MNIST -> ONNX with parity, and the bundle folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from edgekd.artifacts import sha256_file
from edgekd.deploy.bundle import BundleOptions, bundle_from_checkpoint
from edgekd.deploy.guard import GuardConfig
from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.deploy.export import classifier_input_shape, export_with_parity
from edgekd.distill.students import load_student, read_student_checkpoint
from edgekd.data import ArrayRecords
from edgekd.deploy.verify import Reference, onnx_logits, preprocess_records
from tests.helpers.mobile import assert_mobile_form_agrees
from tests.helpers.tiny_students import tiny_student


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet"])
def test_student_export_matches_pytorch_on_real_images(name: str, small_fmnist, tmp_path: Path) -> None:
    checkpoint = read_student_checkpoint(tiny_student(name, small_fmnist))
    model = load_student(checkpoint)
    evalset = preprocess_records(small_fmnist.val, checkpoint.preprocess, limit=64)
    path, parity = export_with_parity(model, tmp_path / "model.onnx", checkpoint.preprocess.input_size,
                                      check_inputs=evalset.images[:])
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic (dynamic) batch axis
    assert proto.opset_import[0].version >= 17
    assert parity.max_abs_diff <= parity.tolerance and parity.top1_agreement >= 0.98 and parity.count == 64
    for batch in (1, 5):  # the dynamic axis really takes any batch
        logits = onnx_logits(path, evalset.images[:batch])
        with torch.no_grad():
            expected = model(torch.from_numpy(evalset.images[:batch])).numpy()
        np.testing.assert_allclose(logits, expected, atol=parity.tolerance)


class _Bessel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x)


def test_unexportable_operator_names_the_module(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.ReLU(), _Bessel()))
    with pytest.raises(EdgekdError, match=r"in module 1\.1 \(_Bessel\).*aten::special_bessel_j0"):
        export_with_parity(model, tmp_path / "m.onnx", (3, 8, 8))
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(EdgekdError, match="opset 13 is not supported"):
        export_with_parity(model, tmp_path / "m.onnx", (3, 8, 8), opset=13)


def test_corrupt_or_foreign_onnx_is_rejected(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf")
    with pytest.raises(EdgekdError, match="not a valid ONNX model"):
        classifier_input_shape(corrupt)
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "foreign", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                          [1, 7])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 7])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(EdgekdError, match="not an image classifier"):
        classifier_input_shape(foreign)


def test_bundle_is_complete_hashed_and_not_overwritten(small_fmnist, tmp_path: Path) -> None:
    checkpoint = read_student_checkpoint(tiny_student("test_resnet", small_fmnist))
    out = tmp_path / "export"
    options = BundleOptions(precisions=("int8_static",), time_models=False, ort_format=True, calibration_images=256)
    result = bundle_from_checkpoint(checkpoint, out, small_fmnist, options)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.ort",
                                                  "model_with_preprocessing.onnx", "model_with_preprocessing.ort",
                                                  "package.json", "predict.mjs", "preprocess.json", "web"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest:
        assert entry["sha256"] == sha256_file(out / entry["path"])
    model_entry = manifest[0]
    assert model_entry["parent"] == str(checkpoint.weights_path)
    assert model_entry["metrics"]["parity"]["max_abs_diff"] <= model_entry["metrics"]["parity"]["tolerance"]
    assert model_entry["metrics"]["quantization"]["trials"], "every quantization decision is recorded"
    assert model_entry["metrics"]["quantization"]["path"] == "model.onnx"  # not the deleted scratch folder's
    assert result.precision == model_entry["config"]["precision"] == "int8_static"
    assert abs(model_entry["metrics"]["accuracy_drop_points"]) <= 1.0
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["labels"] == list(small_fmnist.info.class_names) and pre["input_size"] == [3, 32, 32]
    assert pre["channel_order"] == "RGB" and pre["mean"] == list(checkpoint.preprocess.mean)
    images = preprocess_records(small_fmnist.val, checkpoint.preprocess, limit=64).images[:]
    assert_mobile_form_agrees(out / "model.ort", out / "model.onnx", {"input": images})
    before = sha256_file(out / "model.onnx")
    with pytest.raises(EdgekdError, match="already exists"):
        bundle_from_checkpoint(checkpoint, out, small_fmnist, options)
    assert sha256_file(out / "model.onnx") == before
    # --overwrite replaces a bundle, never a folder that is not one: the student's own, a run's, an app's
    student_folder = checkpoint.weights_path.parent
    app_folder = tmp_path / "myapp"
    (app_folder / "src").mkdir(parents=True)
    (app_folder / "main.py").write_text("important")
    for folder, named in ((student_folder, "student.safetensors"), (app_folder, "main.py, src")):
        held = sorted(p.name for p in folder.iterdir())
        with pytest.raises(EdgekdError, match=f"is not a bundle \\(it holds .*{named}"):
            bundle_from_checkpoint(checkpoint, folder, small_fmnist, replace(options, overwrite=True))
        assert sorted(p.name for p in folder.iterdir()) == held


def test_cli_export_then_predict(small_fmnist, tmp_path: Path) -> None:
    checkpoint_dir = tiny_student("test_resnet", small_fmnist)
    out = tmp_path / "bundle"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(checkpoint_dir), "--out", str(out), "--data", "fashion-mnist",
                                 "--profile", "phone-arm64", "--max-train", "64", "--max-val", "100"])
    assert result.exit_code == 0, result.output
    assert "bundle" in result.output and (out / "model.ort").exists()  # XNNPACK profile: model.ort, no host timing
    image_path = tmp_path / "shoe.png"
    small_fmnist.val[0][0].save(image_path)
    result = runner.invoke(app, ["predict", str(out), str(image_path), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.count(",") == 2 and any(label in result.output for label in small_fmnist.info.class_names)
    result = runner.invoke(app, ["predict", str(tmp_path), str(image_path)])
    assert result.exit_code == 2 and "not an edgekd bundle" in result.output
    shutil.copytree(out, tmp_path / "run" / "export")  # a compress run folder keeps its bundle in export/
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(image_path), "--top-k", "3"])
    assert result.exit_code == 0 and result.output.count(",") == 2, result.output


def test_a_class_sorted_folder_calibrates_and_validates_on_every_class(small_fmnist, tmp_path: Path) -> None:
    """Folder data comes sorted by class: the first N images would calibrate (and rank sensitive nodes) on the first
    classes only. Calibration and validation are stratified random samples, recorded in the manifest."""
    from edgekd.data import load_data
    from edgekd.deploy.verify import sample_indices
    from edgekd.types import DataSpec
    from tests.helpers.images import write_images

    images, labels = small_fmnist.train.images, small_fmnist.train.labels
    keep = np.concatenate([np.flatnonzero(labels == c)[:30] for c in range(small_fmnist.info.num_classes)])
    write_images(tmp_path / "shop", images[keep], labels[keep], small_fmnist.info.class_names)
    folder = load_data(DataSpec(str(tmp_path / "shop")))
    assert list(folder.train.labels) == sorted(folder.train.labels)  # sorted by class, as folders are read
    checkpoint = read_student_checkpoint(tiny_student("test_resnet", small_fmnist))
    options = BundleOptions(precisions=("int8_static",), time_models=False, calibration_images=40,
                            validation_images=30)
    bundle_from_checkpoint(checkpoint, tmp_path / "export", folder, options)
    images_used = json.loads((tmp_path / "export" / "manifest.json").read_text())[0]["metrics"]["images"]
    for role, count in (("calibration", 40), ("validation", 30)):
        record = images_used[role]
        assert record["count"] == count and record["method"].startswith("stratified random")
        assert len(record["per_class"]) == small_fmnist.info.num_classes, (role, record)  # every class is in
    # all of a folder's images (no limit) come shuffled too: the guard ranks sensitive nodes on the first few, and
    # averaged calibration averages over batches in that order
    indices, method = sample_indices(folder.train, None)
    assert sorted(indices) == list(range(len(folder.train))) and "shuffled" in method
    assert len(set(folder.train.labels[indices[:16]].tolist())) >= 5
    assert indices == sample_indices(folder.train, None)[0]  # seeded: the same order every run


def test_fp16_ships_only_within_the_guard_int8_is_held_to(small_fmnist, tmp_path: Path):
    """fp16 (offered with a GPU provider) is checked on the validation images like int8: within the accuracy drop
    and, when asked, the agreement floor; otherwise the bundle ships fp32 and its manifest says so."""
    checkpoint = read_student_checkpoint(tiny_student("test_resnet", small_fmnist))
    fp16 = bundle_from_checkpoint(checkpoint, tmp_path / "fp16", small_fmnist,
                                  BundleOptions(precisions=("fp16",), time_models=False, validation_images=100))
    assert fp16.precision == "fp16"
    floor = GuardConfig(min_agreement=1.01)  # no form can agree on more than every image
    refused = bundle_from_checkpoint(checkpoint, tmp_path / "fp32", small_fmnist,
                                     BundleOptions(precisions=("fp16",), time_models=False, validation_images=100,
                                                   guard=floor))
    assert refused.precision == "fp32" and refused.shipped == refused.fp32
    manifest = json.loads((tmp_path / "fp32" / "manifest.json").read_text())[0]
    assert manifest["config"]["precision"] == "fp32" and manifest["config"]["guard"]["min_agreement"] == 1.01
    assert manifest["metrics"]["accuracy_drop_points"] == 0.0  # fp32 shipped: nothing lost against itself
    # on images without labels fp16's drop is estimated from fp32's probabilities, and the manifest says so
    unlabeled = replace(small_fmnist, val=ArrayRecords(small_fmnist.val.images, np.full(len(small_fmnist.val), -1)))
    fp16 = bundle_from_checkpoint(checkpoint, tmp_path / "unlabeled", unlabeled,
                                  BundleOptions(precisions=("fp16",), time_models=False, validation_images=100))
    metrics = json.loads((tmp_path / "unlabeled" / "manifest.json").read_text())[0]["metrics"]
    assert fp16.precision == "fp16" and fp16.shipped.top1 is None and metrics["accuracy_drop_estimated"]
    images = preprocess_records(unlabeled.val, checkpoint.preprocess, limit=100).images
    answers = onnx_logits(tmp_path / "unlabeled" / "model.onnx", images).argmax(1)
    points, spread = Reference.of(onnx_logits(tmp_path / "fp32" / "model.onnx", images)).estimated_drop(answers)
    assert metrics["accuracy_drop_points"] == pytest.approx(points, abs=1e-6)
    assert metrics["accuracy_drop_standard_error"] == pytest.approx(spread, abs=1e-6)


def test_a_staging_folder_a_killed_export_left_is_removed_by_the_next(tmp_path: Path):
    """kill -9 during an export leaves its hidden staging folder beside the bundle; the next export removes it, and
    never one a running process is writing."""
    import subprocess
    import sys

    from edgekd.artifacts import remove_stale_staging, staging_prefix

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".export.{gone.pid}.abc.tmp"
    live = tmp_path / f"{staging_prefix(tmp_path / 'export')}def.tmp"
    for folder in (stale, live):
        (folder / "model.onnx").parent.mkdir()
        (folder / "model.onnx").write_bytes(b"half")
    remove_stale_staging(tmp_path / "export")
    assert not stale.exists() and live.exists()
