"""Bias correction of static int8: each quantized layer's output means brought back to fp32's (real tiny student,
real Fashion-MNIST images, real ONNX Runtime sessions). Its effect on real weights is in test_real_weights_fidelity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekd.deploy.bias_correction import (_channel_moments, _float_session, _PiecewiseRunner, _quantized_biases,
                                           correct_bias)
from edgekd.deploy.export import export_onnx
from edgekd.deploy.quantize import default_preset, prepare_for_quantization, quantize_onnx
from edgekd.deploy.verify import evaluate_onnx, onnx_logits, preprocess_records
from edgekd.distill.students import load_student, read_student_checkpoint
from tests.helpers.tiny_students import tiny_student

UNCORRECTED = dataclasses.replace(default_preset("avx512_vnni", "int8_static"), bias_correction=False,
                                  learned_rounding=False)


def _quantized(name: str, small_fmnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bias")
    checkpoint = read_student_checkpoint(tiny_student(name, small_fmnist))
    fp32 = export_onnx(load_student(checkpoint), folder / "fp32.onnx", checkpoint.preprocess.input_size)
    calibration = preprocess_records(small_fmnist.train, checkpoint.preprocess, limit=128).images
    prepared = prepare_for_quantization(fp32, folder / "prepared.onnx", calibration[:8])
    int8 = quantize_onnx(prepared, folder / "int8.onnx", "int8_static", calibration=calibration, preset=UNCORRECTED,
                         prepared=True)
    return prepared, int8, calibration, preprocess_records(small_fmnist.val, checkpoint.preprocess)


@pytest.fixture(scope="module")
def quantized(small_fmnist, tmp_path_factory):
    """(prepared fp32 graph, its int8 QDQ form without bias correction, calibration images, validation set)."""
    return _quantized("test_resnet", small_fmnist, tmp_path_factory)


@pytest.fixture(scope="module")
def depthwise(small_fmnist, tmp_path_factory):
    """The same for a student with depthwise convs (timm's test_efficientnet), whose rounding is learned."""
    return _quantized("test_efficientnet", small_fmnist, tmp_path_factory)


def _relative_shifts(prepared: Path, int8: Path, images: np.ndarray) -> np.ndarray:
    """Per layer: mean over channels of |int8 output mean - fp32 output mean| / fp32 spread."""
    biases = _quantized_biases(onnx.load(str(int8)), onnx.load(str(prepared)))
    target, spread = _channel_moments(onnx.load(str(prepared)), [b.reference_output for b in biases], images, 16)
    means, _ = _channel_moments(onnx.load(str(int8)), [b.output for b in biases], images, 16)
    return np.array([np.mean(np.abs(m - t)[s > 1e-6] / s[s > 1e-6]) for m, t, s in zip(means, target, spread)])


def test_piecewise_runs_give_what_a_whole_run_gives(quantized) -> None:
    """Layer by layer from kept tensors, forgetting one on the way, equals running the whole graph for each."""
    _, int8, calibration, _ = quantized
    model = onnx.load(str(int8))
    outputs = [b.output for b in _quantized_biases(model, onnx.load(str(quantized[0])))]
    assert len(outputs) >= 8
    images = calibration[:20]  # not a multiple of the batch size
    runner = _PiecewiseRunner(model, images, batch_size=8)
    expected = _float_session(model, outputs).run(outputs, {"input": images})  # the whole graph, every layer
    held = []
    for k, (name, value) in enumerate(zip(outputs, expected)):
        np.testing.assert_allclose(runner.compute(name), value, rtol=1e-5, atol=1e-5)
        runner.forget(name)
        runner.keep_only_what_needs(outputs[k + 1:])
        held.append(len(runner.kept))
    assert max(held) <= 3, held  # the images, a layer's input and a residual branch: nothing no later layer reads


def test_corrected_layers_have_the_fp32_output_means(quantized, tmp_path: Path) -> None:
    prepared, int8, calibration, evalset = quantized
    before = _relative_shifts(prepared, int8, calibration[:64])
    corrected = tmp_path / "corrected.onnx"
    corrected.write_bytes(int8.read_bytes())
    result = correct_bias(prepared, corrected, calibration)
    assert result.layers == len(before) and result.images == 64 and result.shift > 0
    after = _relative_shifts(prepared, corrected, calibration[:64])
    assert before.mean() > 0.005 and after.mean() < 0.1 * before.mean(), (before, after)
    # only the int32 biases moved; the file still runs with the fused int8 kernels and keeps the answers
    old = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(corrected)).graph.initializer}
    changed = {name for name in old if not np.array_equal(old[name], new[name])}
    assert changed and all(new[name].dtype == np.int32 for name in changed)
    reference = onnx_logits(prepared, evalset.images).argmax(1)
    assert evaluate_onnx(corrected, evalset, reference).agreement >= evaluate_onnx(int8, evalset, reference).agreement - 0.01


def test_static_presets_correct_their_biases_and_say_so(quantized, tmp_path: Path) -> None:
    prepared, int8, calibration, _ = quantized
    preset = default_preset("avx512_vnni", "int8_static")
    assert preset.bias_correction and preset.to_dict()["bias_correction"]  # recorded with the preset in manifests
    assert not default_preset("avx512_vnni", "int8_dynamic").bias_correction
    shipped = quantize_onnx(prepared, tmp_path / "default.onnx", "int8_static", isa="avx512_vnni", calibration=calibration,
                            prepared=True)
    assert _relative_shifts(prepared, shipped, calibration[:64]).mean() < 0.1 * _relative_shifts(
        prepared, int8, calibration[:64]).mean()


def _layer_errors(prepared: Path, int8: Path, images: np.ndarray) -> np.ndarray:
    """Per Conv layer: mean squared error of its output against the fp32 graph's, relative to the fp32 output's
    variance, each layer measured on the inputs the int8 graph gives it."""
    int8_model, fp32_model = onnx.load(str(int8)), onnx.load(str(prepared))
    layers = [b for b in _quantized_biases(int8_model, fp32_model) if b.geometry is not None]
    ours = _float_session(int8_model, [b.output for b in layers]).run(None, {"input": images})
    theirs = _float_session(fp32_model, [b.reference_output for b in layers]).run(None, {"input": images})
    return np.array([np.mean((a - b) ** 2) / np.var(b) for a, b in zip(ours, theirs)])


def test_learned_rounding_fits_each_layer_closer_to_fp32_and_keeps_the_form(depthwise, tmp_path: Path) -> None:
    """AdaRound on top of bias correction, on the depthwise convs: only int8 weights (by one step at most)
    and int32 biases change, the layers' outputs sit closer to fp32's on images it was not fitted on, and the
    answers hold."""
    prepared, int8, calibration, evalset = depthwise
    nearest, learned = tmp_path / "nearest.onnx", tmp_path / "learned.onnx"
    for path, learn in ((nearest, False), (learned, True)):
        path.write_bytes(int8.read_bytes())
        result = correct_bias(prepared, path, calibration, learn_rounding=learn)
    assert result.rounded >= 2 and 0 < result.flipped < 0.5, result
    old = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(nearest)).graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(learned)).graph.initializer}
    changed = [name for name in old if not np.array_equal(old[name], new[name])]
    weights = [name for name in changed if new[name].dtype == np.int8]
    assert weights and {new[name].dtype for name in changed} <= {np.dtype(np.int8), np.dtype(np.int32)}
    assert all(np.abs(new[n].astype(int) - old[n].astype(int)).max() == 1 for n in weights)
    unseen = calibration[64:128]  # correction and rounding fit on the first 64
    before, after = _layer_errors(prepared, nearest, unseen), _layer_errors(prepared, learned, unseen)
    # The first depthwise conv gets the same input either way: its own rounding is all that differs (most of its
    # error is what its int8 input brings, the same either way). Later layers' error must not grow.
    assert after[0] < before[0] and after.mean() <= before.mean(), (before, after)
    reference = onnx_logits(prepared, evalset.images).argmax(1)
    agreement = evaluate_onnx(learned, evalset, reference).agreement
    assert agreement >= evaluate_onnx(nearest, evalset, reference).agreement - 0.01


def test_a_file_for_another_cpu_is_measured_as_that_cpu_computes_it(quantized, monkeypatch) -> None:
    """Int8 kernels differ by CPU (AVX2 without VNNI saturates full-range u8s8 products): a QDQ file for another kind
    of CPU than the host is measured unfused, in float on the dequantized values; a file for this CPU, an fp32 file
    and a QOperator file are measured as this CPU runs them."""
    from edgekd.deploy import verify
    from edgekd.select import profiles

    prepared, int8, calibration, _ = quantized
    monkeypatch.setattr(profiles, "detect_isa", lambda: "avx2")
    assert verify.emulates_target(int8, "avx512_vnni") and verify.emulates_target(int8, "arm64")
    assert not verify.emulates_target(int8, "avx2") and not verify.emulates_target(int8, None)
    assert not verify.emulates_target(prepared, "avx512_vnni")
    emulated = onnx_logits(int8, calibration[:16], target_isa="arm64")
    unfused = _float_session(onnx.load(str(int8))).run(None, {"input": calibration[:16]})[0]
    np.testing.assert_allclose(emulated, unfused, rtol=1e-5, atol=1e-5)
