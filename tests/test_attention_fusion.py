"""A ViT student's attention fused into ONNX Runtime's Attention op for dynamic int8 (QAttention): the fused graph
computes the student, dynamic int8 from it gives the answers dynamic int8 from edgekd's export gives, and the guard
quantizes it for dynamic presets only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import timm

from edgekd.deploy.attention_fusion import export_attention_fused, fusable_copy
from edgekd.deploy.export import export_onnx
from edgekd.deploy.guard import FUSED_ATTENTION, GuardConfig, guarded_quantize
from edgekd.deploy.quantize import quantize_onnx
from edgekd.deploy.verify import onnx_logits, preprocess_records
from edgekd.distill.students import load_student, read_student_checkpoint
from edgekd.select.candidates import deployment_forms
from tests.helpers.tiny_students import tiny_student


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_a_trained_vit_s_attention_is_fused_and_dynamic_int8_keeps_its_answers(small_fmnist, tmp_path):
    checkpoint = read_student_checkpoint(tiny_student("test_vit", small_fmnist))
    model, size = load_student(checkpoint), checkpoint.preprocess.input_size
    evalset = preprocess_records(small_fmnist.val, checkpoint.preprocess, limit=200)
    plain = export_onnx(model, tmp_path / "plain.onnx", size)
    fused = export_attention_fused(model, tmp_path / "fused.onnx", size, opset=17, check_inputs=evalset.images[:16])
    assert fused is not None
    graph = onnx.load(str(fused)).graph
    assert sum(node.op_type == "Attention" for node in graph.node) == len(model.blocks)
    assert not {"Softmax", "MatMul"} - op_types(plain) and "Softmax" not in op_types(fused)  # attention inside the op
    np.testing.assert_allclose(onnx_logits(fused, evalset.images), onnx_logits(plain, evalset.images), atol=1e-4)
    dynamic_plain = quantize_onnx(plain, tmp_path / "plain.int8.onnx", "int8_dynamic", isa="avx512_vnni")
    dynamic_fused = quantize_onnx(fused, tmp_path / "fused.int8.onnx", "int8_dynamic", isa="avx512_vnni")
    assert "QAttention" in op_types(dynamic_fused) and "QAttention" not in op_types(dynamic_plain)
    # QAttention quantizes the block's input once for q, k and v, as the three MatMulIntegers of the export do: the
    # logits differ by float rounding, far less than int8 moves them from fp32's
    fp32, from_fused, from_plain = (onnx_logits(p, evalset.images) for p in (plain, dynamic_fused, dynamic_plain))
    assert np.abs(from_fused - from_plain).max() < 0.2 * np.abs(from_plain - fp32).max()
    assert (from_fused.argmax(1) == from_plain.argmax(1)).mean() >= 0.99


def test_models_without_plain_vit_attention_are_left_as_exported(tmp_path):
    assert fusable_copy(timm.create_model("test_resnet")) is None  # a CNN
    # a ViT whose blocks ORT's fusion does not match (layer scale, register tokens): nothing half-fused is kept
    vit2 = timm.create_model("test_vit2", num_classes=10).eval()
    assert fusable_copy(vit2) is not None
    size = vit2.pretrained_cfg["input_size"]
    assert export_attention_fused(vit2, tmp_path / "vit2.onnx", size, opset=17) is None
    assert not (tmp_path / "vit2.onnx").exists()


def test_the_guard_quantizes_the_fused_graph_for_dynamic_presets_only(small_fmnist, tmp_path):
    checkpoint = read_student_checkpoint(tiny_student("test_vit", small_fmnist))
    model, size = load_student(checkpoint), checkpoint.preprocess.input_size
    evalset = preprocess_records(small_fmnist.val, checkpoint.preprocess, limit=120)
    calibration = preprocess_records(small_fmnist.train, checkpoint.preprocess, limit=64).images
    plain = export_onnx(model, tmp_path / "plain.onnx", size)
    fused = export_attention_fused(model, tmp_path / "fused.onnx", size, opset=17)
    shipped = {}
    for precision in ("int8_static", "int8_dynamic"):
        out = tmp_path / f"{precision}.onnx"
        decision = guarded_quantize(plain, out, evalset=evalset, calibration=calibration, isa="avx512_vnni",
                                    precisions=(precision,), guard=GuardConfig(max_accuracy_drop=5.0),
                                    attention_fused=fused)
        assert decision.precision == precision, decision.reason
        shipped[precision] = (decision.preset.name, op_types(out))
    static_name, static_ops = shipped["int8_static"]
    dynamic_name, dynamic_ops = shipped["int8_dynamic"]
    assert not static_name.endswith(FUSED_ATTENTION) and "Attention" not in static_ops  # QDQ has no int8 Attention
    assert dynamic_name == f"dynamic_matmul{FUSED_ATTENTION}" and "QAttention" in dynamic_ops


def test_candidate_selection_times_a_vit_s_dynamic_int8_in_the_form_that_ships(tmp_path):
    """Selection and probe packs time each precision as compress ships it: a ViT's dynamic int8 with QAttention."""
    vit = timm.create_model("test_vit", num_classes=10).eval()
    forms = deployment_forms(vit, (3, 160, 160), ("fp32", "int8_dynamic"), "avx512_vnni", tmp_path, "vit")
    assert "QAttention" in op_types(forms["int8_dynamic"]) and "Attention" not in op_types(forms["fp32"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.fp32.onnx", "vit.int8_dynamic.onnx"]  # no leftovers


def test_dynamic_int8_falls_back_to_the_plain_graph(small_fmnist, tmp_path):
    """The fused graph is a faster form, never a new way to fail: one that cannot be prepared is left out, and a
    dynamic preset that fails on it is tried again on the plain export."""
    checkpoint = read_student_checkpoint(tiny_student("test_vit", small_fmnist))
    model, size = load_student(checkpoint), checkpoint.preprocess.input_size
    evalset = preprocess_records(small_fmnist.val, checkpoint.preprocess, limit=120)
    calibration = preprocess_records(small_fmnist.train, checkpoint.preprocess, limit=64).images
    plain = export_onnx(model, tmp_path / "plain.onnx", size)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    decision = guarded_quantize(plain, tmp_path / "a.onnx", evalset=evalset, calibration=calibration,
                                isa="avx512_vnni", precisions=("int8_dynamic",), attention_fused=broken,
                                guard=GuardConfig(max_accuracy_drop=5.0))
    assert decision.precision == "int8_dynamic" and decision.preset.name == "dynamic_matmul"
    fused = export_attention_fused(model, tmp_path / "fused.onnx", size)
    decision = guarded_quantize(plain, tmp_path / "b.onnx", evalset=evalset, calibration=calibration,
                                isa="avx512_vnni", precisions=("int8_dynamic",), attention_fused=fused,
                                guard=GuardConfig(max_accuracy_drop=-1.0, max_rounds=1))  # nothing passes
    assert decision.precision == "fp32"
    assert [t.preset.name for t in decision.trials if t.float_nodes_by is None] == [
        f"dynamic_matmul{FUSED_ATTENTION}", "dynamic_matmul"]
