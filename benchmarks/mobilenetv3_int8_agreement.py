"""Benchmark: why a MobileNetV3-large student's static int8 keeps its top-1 but not its answers.

quantization_fidelity.py's MobileNetV3-large student (part B's training: 6,000 Fashion-MNIST images, 64 px, 2
epochs, same seed) ships static int8 at -0.50 points of top-1 but agrees with fp32 on 82.9%. This takes the same
student and the avx512_vnni static preset (minmax ranges, no weight corrections, so each row changes one thing),
computed as that CPU computes it (QDQ unfused, in float), on the first 3,000 images of the test split, and measures
agreement with fp32 for: int8 weights with float activations; every activation quantized; the classifier alone
quantized (its input and weights), everything else in float; the N nodes whose tensors lose most to their own
quantization kept in float (each tensor's fp32 values through its own scale and zero point, error against the
tensor's variance per channel, averaged over channels); dynamic int8; the QOperator form of static int8, as that
CPU computes it and in this host's own kernels; what the accuracy guard ships at 0.5 points, without and with
`--min-agreement 95`. And agreement by fp32's top-2 margin.

    flock /tmp/edgekd-cpu.lock python benchmarks/mobilenetv3_int8_agreement.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization_host import TRAIN_IMAGES, VAL_IMAGES, exported_student  # noqa: E402

from edgekd.data import load_data  # noqa: E402
from edgekd.deploy.quantize import U8S8_QOPERATOR, default_preset, prepare_for_quantization, quantize_onnx  # noqa: E402
from edgekd.deploy.guard import GuardConfig, guarded_quantize  # noqa: E402
from edgekd.deploy.sensitivity import _activation_bounds, _channel_counts, _Images  # noqa: E402
from edgekd.deploy.verify import EvalSet, onnx_logits  # noqa: E402
from edgekd.select.profiles import detect_isa  # noqa: E402
from edgekd.types import DataSpec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ISA, IMAGES, STUDENT = "avx512_vnni", 3000, "mobilenetv3_large_100"
MARGIN_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.01)


def own_quantization_error(fp32: Path, quantized: Path, images: np.ndarray) -> dict[str, float]:
    """Each quantized activation's fp32 values through its own QuantizeLinear's scale and zero point: noise against
    the tensor's variance, per channel (at most 1), averaged over channels. Nothing upstream is quantized, so a tensor
    whose inputs are already coarse in the QDQ graph is not let off."""
    graph = onnx.load(str(quantized)).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    params = {n.input[0]: (constants[n.input[1]], constants[n.input[2]]) for n in graph.node
              if n.op_type == "QuantizeLinear" and n.input[1] in constants and len(n.input) > 2}
    with tempfile.TemporaryDirectory() as work:
        modify_model_output_intermediate_tensors(str(fp32), f"{work}/float.onnx")
        activations = collect_activations(f"{work}/float.onnx", _Images(images))
    bounds, channels = _activation_bounds(onnx.load(str(fp32))), _channel_counts(fp32)
    errors = {}
    for name, (scale, zero) in params.items():
        if name not in activations or scale.size != 1:
            continue
        x = np.stack(activations[name]).astype(np.float64)
        if name in bounds:  # a Relu/Clip the quantizer folded into the range: the clipping is the model's
            x = np.clip(x, *bounds[name])
        info, z = np.iinfo(zero.dtype), float(zero)
        xq = (np.clip(np.round(x / float(scale)) + z, info.min, info.max) - z) * float(scale)
        count = channels.get(name, 1) if x.shape[1] % channels.get(name, 1) == 0 else 1
        x, xq = x.reshape(len(x), count, -1), xq.reshape(len(x), count, -1)
        noise, variance = np.mean((x - xq) ** 2, axis=(0, 2)), np.var(x, axis=(0, 2))
        floor = max(1e-3 * float(np.median(variance)), 1e-12)
        errors[name] = float(np.mean(np.minimum(noise / np.maximum(variance, floor), 1.0)))
    return errors


def worst_nodes(prepared: Path, errors: dict[str, float]) -> list[str]:
    """Nodes to keep in float, worst tensor first: its producer and its readers."""
    graph = onnx.load(str(prepared)).graph
    producer = {out: node.name for node in graph.node for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    ranked: list[str] = []
    for tensor in sorted(errors, key=errors.get, reverse=True):
        for node in [producer.get(tensor, ""), *readers.get(tensor, [])]:
            if node and node not in ranked:
                ranked.append(node)
    return ranked


def weights_in_int8(prepared: Path, out: Path) -> Path:
    """The graph with every conv / classifier weight rounded to symmetric per-channel int8, activations in float."""
    model = onnx.load(str(prepared))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 4 or (w.ndim == 2 and w.size > 1000):
            scale = np.abs(w).max(axis=tuple(range(1, w.ndim)), keepdims=True) / 127 + 1e-12
            init.CopyFrom(numpy_helper.from_array((np.round(w / scale) * scale).astype(np.float32), init.name))
    onnx.save(model, str(out))
    return out


def main() -> None:
    torch.set_num_threads(2)
    data = load_data(DataSpec("fashion-mnist", max_train=TRAIN_IMAGES, max_val=VAL_IMAGES))
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        student = exported_student(STUDENT, False, 2, data, work)
        images, labels = student.evalset.images[:IMAGES], student.evalset.labels[:IMAGES]
        calibration, fp32 = student.calibration, student.fp32
        logits = onnx_logits(fp32, images)
        reference = logits.argmax(1)
        prepared = prepare_for_quantization(fp32, work / "prepared.onnx", calibration[:8])
        preset = replace(default_preset(ISA, "int8_static"), bias_correction=False, learned_rounding=False)

        def static(tag: str, exclude: tuple[str, ...] = ()) -> Path:
            return quantize_onnx(prepared, work / f"{tag}.onnx", "int8_static", isa=ISA, calibration=calibration,
                                 preset=preset, nodes_to_exclude=exclude, prepared=True)

        def row(label: str, path: Path, emulate: bool = True, **facts) -> np.ndarray:
            predictions = onnx_logits(path, images, target_isa=ISA if emulate else None).argmax(1)
            rows[label] = {"agreement": float((predictions == reference).mean()),
                           "drop": 100 * float((reference == labels).mean() - (predictions == labels).mean()), **facts}
            print(label, rows[label], flush=True)
            return predictions

        row("int8 weights, float activations", weights_in_int8(prepared, work / "weights.onnx"), emulate=False)
        every = static("every")
        every_predictions = row("static int8, every activation (minmax)", every)
        not_classifier = tuple(n.name for n in onnx.load(str(prepared)).graph.node if n.op_type != "Gemm")
        row("static int8, the classifier alone (its input and weights)",
            static("classifier", not_classifier))
        errors = own_quantization_error(prepared, every, calibration[:64])
        worst = max(errors, key=errors.get)
        ranked = worst_nodes(prepared, errors)
        for count in (3, 12, 24):
            row(f"static int8, the {count} worst nodes in float", static(f"float{count}", tuple(ranked[:count])),
                float_nodes=count)
        row("dynamic int8 (dynamic_matmul)", quantize_onnx(fp32, work / "dynamic.onnx", "int8_dynamic", isa=ISA))
        # The QOperator form (QLinearConv, QGemm) has no QDQ graph to unfuse: its integer products are rewritten in
        # float and requantized as the op does (integer_emulation.py); this host's own kernels beside it.
        qoperator = quantize_onnx(prepared, work / "qoperator.onnx", "int8_static", isa=ISA, calibration=calibration,
                                  preset=U8S8_QOPERATOR, prepared=True)
        row("static int8, QOperator form (minmax)", qoperator)
        row(f"static int8, QOperator form (minmax), in this {detect_isa()} host's kernels", qoperator, emulate=False)
        # What the accuracy guard ships for this student at issue 11's 0.5 points, without and with a 95% floor
        # (no timings: it ships its first passing form, static before dynamic, as for another CPU).
        for floor in (None, 0.95):
            decision = guarded_quantize(fp32, work / "guarded.onnx", evalset=EvalSet(images, labels),
                                        calibration=calibration, isa=ISA,
                                        guard=GuardConfig(max_accuracy_drop=0.5, min_agreement=floor))
            shipped = next((t for t in decision.trials if t.passed), None)
            label = "the guard at 0.5 points" + (f", --min-agreement {100 * floor:g}" if floor else "")
            rows[f"{label}: ships {decision.precision}"] = {
                "agreement": shipped.agreement if shipped else 1.0, "drop": shipped.accuracy_drop if shipped else 0.0,
                "trials": len(decision.trials), "reason": decision.reason}
            print(label, rows[f"{label}: ships {decision.precision}"], flush=True)
        feature = np.concatenate([_tensor(prepared, worst, calibration[i:i + 32]) for i in range(0, 256, 32)])

    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    top2 = np.sort(probabilities, 1)
    margin = top2[:, -1] - top2[:, -2]
    by_margin = []
    for low, high in zip(MARGIN_BINS, MARGIN_BINS[1:]):
        inside = (margin >= low) & (margin < high)
        by_margin.append({"low": low, "high": min(high, 1.0), "images": int(inside.sum()),
                          "agreement": float((every_predictions[inside] == reference[inside]).mean())})
    results = {"date": date.today().isoformat(), "student": STUDENT, "isa": ISA, "images": IMAGES,
               "fp32_top1": float((reference == labels).mean()), "rows": rows, "by_margin": by_margin,
               "worst_tensor": {"name": worst, "own_error": errors[worst], "max": float(feature.max()),
                                "p99": float(np.percentile(feature, 99)), "p1": float(np.percentile(feature, 1))},
               "onnxruntime": ort.__version__, "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mobilenetv3_int8_agreement.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "mobilenetv3_int8_agreement.md").write_text(report(results))
    print(report(results))


def _tensor(model_path: Path, name: str, images: np.ndarray) -> np.ndarray:
    model = onnx.load(str(model_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {session.get_inputs()[0].name: images})[0].reshape(len(images), -1)


def report(results: dict) -> str:
    worst = results["worst_tensor"]
    lines = [f"# Why {results['student']}'s static int8 keeps top-1 but not its answers", "",
             f"quantization_fidelity.py's 2-epoch student (fp32 top-1 {100 * results['fp32_top1']:.2f}% on the "
             f"first {results['images']:,} test images), the {results['isa']} static preset with minmax ranges and "
             "no weight corrections (each row changes one thing), computed as that CPU computes it (QDQ unfused, in "
             f"float). onnxruntime {results['onnxruntime']}, torch {results['torch']}; {results['date']}.", "",
             "Reproduce: `flock /tmp/edgekd-cpu.lock python benchmarks/mobilenetv3_int8_agreement.py`", "",
             "| form | agreement with fp32 | top-1 drop (pts) |", "|---|---:|---:|"]
    lines += [f"| {label} | {100 * r['agreement']:.1f}% | {r['drop']:.2f} |" for label, r in results["rows"].items()]
    lines += ["", "Static int8 (every activation) by fp32's top-2 probability margin:", "",
              "| margin | images | agreement |", "|---|---:|---:|"]
    lines += [f"| {b['low']:g}-{b['high']:g} | {b['images']} | {100 * b['agreement']:.1f}% |"
              for b in results["by_margin"]]
    lines += ["", f"The tensor that loses most to its own quantization: `{worst['name']}` (error "
              f"{worst['own_error']:.2f} of its variance, per channel, averaged over channels): over the 256 "
              f"calibration images its values reach {worst['max']:.1f}, while 98% of them lie within "
              f"{worst['p1']:.2f} .. {worst['p99']:.2f}; one uint8 scale for the whole tensor leaves those a few "
              "levels.", "", "Notes:", ""] + NOTES
    return "\n".join(lines) + "\n"


NOTES = [
    "- Weight rounding alone flips 1.8% of the answers; with every activation quantized too, 10.7%. The classifier's "
    "input (its features within +-0.3 but for a few outliers) accounts for 8 of those points on its own (the "
    "classifier-alone row), but keeping it in float does not buy them back: with it and the next-worst tensors' nodes "
    "in float (3, 12, 24 nodes) agreement stays at 89.5-90.3%, because the rest of the error is spread over the "
    "network's 60-odd convolutions and lands on the same near-ties (the margin table).",
    "- So neither the guard's calibrations (minmax 89.3% here; entropy 82.9% on the whole test split) nor keeping "
    "nodes in float makes this student keep its answers as static int8: top-1 holds (the issue's criterion; "
    "the guard ships entropy-calibrated static int8 at -0.63 +- 0.64 here, 83.3% agreement; -0.50 +- 0.36 on the "
    "whole split, quantization_fidelity_avx512_vnni.md), answers do not. With `--min-agreement 95` the guard "
    "tries 12 forms (three calibrations, then rounds of nodes in float) and ships dynamic int8 (100.0%: it computes "
    "the classifier's input range per image); that quantizes the classifier only and is no faster than fp32, so "
    "where timings are known fp32 ships instead.",
    "- The QOperator form (`u8s8_qoperator_per_channel`, which `--search-quantization` tries) has no QDQ graph to "
    "run unfused: its QLinearConv / QGemm products are computed in float and requantized as the ops do "
    "(edgekd/deploy/integer_emulation.py). So computed it agrees on 89.4%, as the QDQ form does (89.3%); this AVX2 "
    "host's own kernels, which saturate pairs of products at int16, give 80.9% and 3.13 points lost: what the guard "
    "measured for a VNNI target before 2026-12-06.",
    "- The ranking here is each tensor's fp32 values through its own scale and zero point (no upstream rounding). "
    "The guard's ranking (edgekd/deploy/sensitivity.py: the error a tensor's quantization adds in the QDQ graph) "
    "scores the classifier's input 0.004, 11th: in the QDQ graph its values are already coarse, computed from the "
    "quantized head convolution's output, so its own rounding adds little to them.",
]


if __name__ == "__main__":
    main()
