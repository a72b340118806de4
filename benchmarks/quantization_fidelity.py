"""Benchmark: does what edgekd ships as int8 keep a trained student's answers, on a CPU kind this host may not be?

Issue 11's fidelity targets (int8 loses <= 0.5 point of top-1 for a CNN, <= 1 for DeiT-tiny), measured with the
current code on quantization_host.py's part B students (same training, seed, data, 64 px, the whole 10,000-image
test split, 256 stratified calibration images), for a target ISA (default avx512_vnni) as that CPU computes it:
this host's own kernels when it is one; when not, the QDQ graph run unfused (in float on the dequantized values)
and dynamic int8's integer products computed in float (edgekd.deploy.verify.emulates_target). No latency: timings
on another kind of CPU say nothing, so the guard runs without them and ships its first passing form (static before
dynamic), as it does for a probe profile without a latency table. Each student's row is kept as it finishes; a
re-run goes on with the rest.

    flock /tmp/edgekd-cpu.lock python benchmarks/quantization_fidelity.py [--isa avx512_vnni]
        [--students mobilenetv3_large_100,efficientnet_b0]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization_host import CALIBRATION_IMAGES, SIZE, STUDENTS, TRAIN_IMAGES, VAL_IMAGES, exported_student  # noqa: E402

from edgekd.data import load_data  # noqa: E402
from edgekd.deploy.export import is_transformer  # noqa: E402
from edgekd.deploy.quantize import default_preset, quantize_onnx  # noqa: E402
from edgekd.deploy.guard import GuardConfig, guarded_quantize  # noqa: E402
from edgekd.deploy.verify import EvalSet, drop_standard_error, emulates_target, onnx_logits  # noqa: E402
from edgekd.select.profiles import detect_isa  # noqa: E402
from edgekd.types import DataSpec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET_DROP = {"cnn": 0.5, "transformer": 1.0}  # issue 11's targets, in points of top-1


def figures(path: Path, evalset: EvalSet, reference: np.ndarray, fp32_top1: float, isa: str) -> dict[str, Any]:
    predictions = onnx_logits(path, evalset.images, target_isa=isa).argmax(1)
    top1 = float((predictions == evalset.labels).mean())
    return {"top1": top1, "drop": 100 * (fp32_top1 - top1),
            "drop_se": drop_standard_error(reference, predictions, evalset.labels),
            "agreement": float((predictions == reference).mean()),
            "emulated": emulates_target(path, isa)}


def student_row(name: str, pretrained: bool, epochs: int, data, isa: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        student = exported_student(name, pretrained, epochs, data, work)
        evalset, calibration, fp32 = student.evalset, student.calibration, student.fp32
        reference = onnx_logits(fp32, evalset.images).argmax(1)
        fp32_top1 = float((reference == evalset.labels).mean())
        transformer = is_transformer(onnx.load(str(fp32)))
        target = TARGET_DROP["transformer" if transformer else "cnn"]
        static = default_preset(isa, "int8_static", transformer)
        forms = {f"int8_static ({static.name}, minmax)": quantize_onnx(
                     fp32, work / "static.onnx", "int8_static", isa=isa, calibration=calibration),
                 f"int8_dynamic ({default_preset(isa, 'int8_dynamic').name})": quantize_onnx(
                     fp32, work / "dynamic.onnx", "int8_dynamic", isa=isa)}
        measured = {label: figures(path, evalset, reference, fp32_top1, isa) for label, path in forms.items()}
        started = time.perf_counter()
        decision = guarded_quantize(fp32, work / "shipped.onnx", evalset=evalset, calibration=calibration, isa=isa,
                                    guard=GuardConfig(max_accuracy_drop=target))
        shipped = next((t for t in decision.trials if t.passed), None)
    return {**student.facts, "fp32_top1": fp32_top1, "target_drop": target, "forms": measured,
            "guard_s": time.perf_counter() - started,
            "shipped": {"precision": decision.precision, "reason": decision.reason,
                        "drop": shipped.accuracy_drop if shipped else None,
                        "drop_se": shipped.drop_se if shipped else None,
                        "agreement": shipped.agreement if shipped else None,
                        "meets_target": bool(shipped and shipped.accuracy_drop <= target)},
            "trials": [{"preset": t.preset.name, "calibration": t.calibration_method, "excluded": len(t.excluded_nodes),
                        "float_nodes_by": t.float_nodes_by, "drop": t.accuracy_drop, "drop_se": t.drop_se,
                        "agreement": t.agreement, "passed": t.passed} for t in decision.trials]}


def report(results: dict) -> str:
    isa, host = results["isa"], results["host_isa"]
    how = "this host's own kernels" if isa == host else (
        f"on a {host} host as an int8 unit that does not saturate computes it: static int8 (QDQ) run unfused, in float "
        "on the dequantized values, dynamic int8 with its integer products computed in float "
        "(edgekd/deploy/integer_emulation.py; this host's own kernels saturate pairs of uint8 x int8 products)")
    lines = [f"# What int8 keeps: part B's students, as a CPU with {isa} computes it", "",
             f"Students trained as `quantization_host.py` part B trains them ({TRAIN_IMAGES:,} Fashion-MNIST images, "
             f"{SIZE} px, same seed), measured on the whole test split ({VAL_IMAGES:,} images), {CALIBRATION_IMAGES} "
             f"stratified training images calibrate. Measured {how}. Drop: fp32 top-1 minus the form's, in points, "
             "+- its standard error on the paired predictions. The guard is asked for issue 11's target (0.5 point "
             "for a CNN, 1 for DeiT-tiny) with no timings (another CPU's speed is not measured here), so it ships "
             "its first passing form. onnxruntime " + results["onnxruntime"] + ", torch " + results["torch"] + ".", "",
             f"Reproduce: `flock /tmp/edgekd-cpu.lock python benchmarks/quantization_fidelity.py --isa {isa} "
             "--students all` (rows already in the JSON are kept)", "",
             "| student | fp32 top-1 | form | drop (pts) | agreement | computed as |", "|---|---:|---|---:|---:|---|"]
    for name, row in results["students"].items():
        student = f"{name} ({row['start']}, {row['epochs']} epochs; {row['date']})"
        for label, form in row["forms"].items():
            computed = f"{isa}, emulated" if form["emulated"] else f"this host's {host} kernels"
            lines.append(f"| {student} | {100 * row['fp32_top1']:.2f}% | {label} | "
                         f"{form['drop']:.2f} +- {form['drop_se']:.2f} | {100 * form['agreement']:.1f}% | "
                         f"{computed} |")
        shipped = row["shipped"]
        tried = "; ".join(f"{t['preset']} {t['calibration'] or ''} {t['excluded']} in float"
                          f"{' (' + t['float_nodes_by'] + ')' if t['float_nodes_by'] else ''}: {t['drop']:.2f}"
                          for t in row["trials"])
        verdict = "meets" if shipped["meets_target"] else "misses"
        drop = (f"{shipped['drop']:.2f} +- {shipped['drop_se']:.2f}" if shipped["drop"] is not None else "-")
        agreement = f"{100 * shipped['agreement']:.1f}%" if shipped["agreement"] is not None else "-"
        lines.append(f"| **{name}: the guard ships {shipped['precision']}** ({verdict} the {row['target_drop']}-point "
                     f"target; {row['guard_s']:.0f} s; tried: {tried}) | | | {drop} | {agreement} | |")
    return "\n".join(lines + ["", "Notes:", ""] + NOTES) + "\n"


NOTES = [
    "- 2026-12-06 (MobileNetV3-large, EfficientNet-B0): a first run measured dynamic int8 in this AVX2 host's own "
    "kernels, which saturate pairs of uint8 x int8 products at int16: there the B0 student's dynamic int8 lost 4.96 "
    "+- 0.23 points (agreement 94.3%) and MobileNetV3's 0.06; computed as VNNI computes it (this table) 0.00 and "
    "0.04. The AMX host's own kernels gave 0.06 for part B's B0 on 2026-12-04 (another training of it).",
    "- EfficientNet-B0 (2 epochs), part B's unmet row (static int8 lost 52.89 points there and fp32 shipped), now "
    "ships static int8 at -0.01 +- 0.22: entropy ranges, and neither weight correction (the held-out check).",
    "- MobileNetV3-large ships static int8 at -0.50 +- 0.36 points, but agrees with fp32 on only 82.9%: entropy "
    "ranges, after minmax and percentile lost 1.14 and 1.12. Top-1 is the guard's criterion (and the issue's); "
    "answers change on one image in six at equal accuracy. The guard picks among three calibrations on the same "
    "images, so its best figure is optimistic by a fraction of the standard error. Why, and what "
    "`--min-agreement` does about it: mobilenetv3_int8_agreement.md.",
    "- Every student here meets issue 11's target as avx512_vnni computes it (2026-12-06, today's code): ResNet-18 "
    "-0.22, DeiT-tiny 0.06 (weight MatMuls only), the fine-tuned Lite0 -0.04, each static int8 agreeing on 99.2-99.8%; "
    "MobileNetV3-large and the 2-epoch EfficientNet-B0 above.",
    "- Guard times of MobileNetV3-large and EfficientNet-B0 share the machine with a run of the test suite (about 2x); "
    "the other three ran alone.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--isa", default="avx512_vnni")
    parser.add_argument("--students", default="mobilenetv3_large_100,efficientnet_b0",
                        help="comma-separated part B students (2-epoch rows), or 'all'")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(2)
    chosen = [s for s in STUDENTS if s[2] == 2 and (args.students == "all" or s[0] in args.students.split(","))]
    if not chosen:
        raise SystemExit(f"no part B student named in {args.students!r}: {', '.join(s[0] for s in STUDENTS)}")
    path = RESULTS / f"quantization_fidelity_{args.isa}.json"
    results = json.loads(path.read_text()) if path.exists() else {"students": {}}
    results |= {"isa": args.isa, "host_isa": detect_isa(), "onnxruntime": ort.__version__, "torch": torch.__version__}
    data = load_data(DataSpec("fashion-mnist", max_train=TRAIN_IMAGES, max_val=VAL_IMAGES))
    for name, pretrained, epochs in chosen:
        if name in results["students"]:
            continue
        results["students"][name] = {**student_row(name, pretrained, epochs, data, args.isa),
                                     "date": date.today().isoformat()}
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        path.with_suffix(".md").write_text(report(results))
        print(report(results), flush=True)


if __name__ == "__main__":
    main()
