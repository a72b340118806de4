"""Benchmark: when does int8 pay on this CPU, and when does edgekd fall back to fp32?

Part A (latency, 224x224, batch 1, 1 thread): every quantization preset of the host's ISA plus fp32 and fp16, for
CNNs, mobile nets and a ViT. Weights do not change latency, so these use random weights, except
tf_efficientnet_lite0, which has real ImageNet weights here: its int8 agreement with fp32 is measured on real
(Fashion-MNIST) images.
Part B (the accuracy guard on trained students): students fine-tuned briefly on real Fashion-MNIST at 64 px,
quantized by edgekd's guarded search (`guarded_quantize(search=True)`): accuracy of each form, and what ships.

    flock /tmp/edgekd-cpu.lock python benchmarks/quantization_host.py [latency|guard|table]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from edgekd.data import load_data
from edgekd.errors import EdgekdError
from edgekd.export import export_onnx
from edgekd.finetune import train_classifier
from edgekd.latency import measure_onnx
from edgekd.models import create_model, preprocess_for, read_state_dict
from edgekd.profiles import detect_isa
from edgekd.quantize import GuardConfig, guarded_quantize, prepare_for_quantization, presets_for, quantize_onnx
from edgekd.types import DataSpec, TrainConfig
from edgekd.verify import evaluate_onnx, onnx_logits, preprocess_records

RESULTS = Path(__file__).parent / "results"
JSON_PATH = RESULTS / "quantization_host.json"
LATENCY_MODELS = ("resnet18", "resnet50", "mobilenetv3_large_100", "efficientnet_b0", "deit_tiny_patch16_224",
                  "tf_efficientnet_lite0")
GUARD_MODELS = ("resnet18", "mobilenetv3_large_100", "deit_tiny_patch16_224")
GUARD_SIZE = 64
GUARD_TRAIN_IMAGES, GUARD_VAL_IMAGES, CALIBRATION_IMAGES = 6000, 1000, 128
THREADS = 1


def _timing(shape: tuple[int, int, int]):
    def p50_ms(path: Path) -> float:
        return measure_onnx(path, shape, threads=THREADS, min_seconds=2.0, min_runs=20).p50_ms
    return p50_ms


def _lite0_weights(model: torch.nn.Module) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers.efficientnet_lite0 import convert_to_timm

    with tempfile.TemporaryDirectory() as work:
        model.load_state_dict(read_state_dict(convert_to_timm(Path(work) / "lite0.safetensors")))


def latency_stage(results: dict) -> None:
    isa = detect_isa()
    data = load_data(DataSpec("fashion-mnist", max_train=256, max_val=500))
    rows = results.setdefault("latency", {})
    for name in LATENCY_MODELS:
        if name in rows:
            continue
        real = name == "tf_efficientnet_lite0"
        model = create_model(name, 1000, (224, 224)).eval()
        if real:
            _lite0_weights(model)
        pre = preprocess_for(model, (224, 224))
        if real:
            pre = type(pre)(**{**pre.to_dict(), "mean": (0.5,) * 3, "std": (0.5,) * 3})
        calibration = preprocess_records(data.train, pre, CALIBRATION_IMAGES).images
        evalset = preprocess_records(data.val, pre, 500 if real else 100)
        timing = _timing(pre.input_size)
        with tempfile.TemporaryDirectory() as work:
            fp32 = export_onnx(model, Path(work) / "fp32.onnx", pre.input_size)
            prepared = prepare_for_quantization(fp32, Path(work) / "prepared.onnx")
            reference = onnx_logits(fp32, evalset.images).argmax(1)
            forms = [("fp32", None), ("fp16", None)] + [(f"int8_{p.mode}", p) for p in presets_for(isa)]
            row = []
            for precision, preset in forms:
                target = Path(work) / f"{precision}_{preset.name if preset else ''}.onnx"
                source = prepared if preset else fp32
                started = time.perf_counter()
                try:
                    quantize_onnx(source, target, precision, isa=isa, calibration=calibration, preset=preset,
                                  prepared=preset is not None)
                except EdgekdError as error:
                    row.append({"precision": precision, "preset": preset.name if preset else precision,
                                "error": str(error)})
                    print(name, row[-1], flush=True)
                    continue
                quantize_s = time.perf_counter() - started
                row.append({"precision": precision, "preset": preset.name if preset else precision,
                            "p50_ms": timing(target), "size_mb": target.stat().st_size / 1e6,
                            "agreement": evaluate_onnx(target, evalset, reference).agreement,
                            "quantize_s": quantize_s})
                print(name, row[-1], flush=True)
        rows[name] = {"real_weights": real, "agreement_images": len(evalset), "forms": row}
        _save(results)


def guard_stage(results: dict) -> None:
    isa = detect_isa()
    data = load_data(DataSpec("fashion-mnist", max_train=GUARD_TRAIN_IMAGES, max_val=GUARD_VAL_IMAGES))
    rows = results.setdefault("guard", {})
    for name in GUARD_MODELS:
        if name in rows:
            continue
        model = create_model(name, data.info.num_classes, (GUARD_SIZE, GUARD_SIZE))
        pre = preprocess_for(model, (GUARD_SIZE, GUARD_SIZE))
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            model, _ = train_classifier(model, data, pre, TrainConfig(epochs=2, batch_size=64, lr=2e-3, device="cpu",
                                                                      num_workers=1), Path(work), label=name)
            train_s = time.perf_counter() - started
            evalset = preprocess_records(data.val, pre)
            calibration = preprocess_records(data.train, pre, CALIBRATION_IMAGES).images
            fp32 = export_onnx(model, Path(work) / "fp32.onnx", pre.input_size)
            decision = guarded_quantize(fp32, Path(work) / "model.onnx", evalset=evalset, calibration=calibration,
                                        isa=isa, guard=GuardConfig(max_accuracy_drop=1.0), search=True,
                                        timing=_timing(pre.input_size))
        rows[name] = {"input": GUARD_SIZE, "train_images": GUARD_TRAIN_IMAGES, "val_images": len(evalset),
                      "train_s": train_s, **decision.to_dict()}
        print(name, decision.precision, decision.reason, flush=True)
        _save(results)


def _save(results: dict) -> None:
    results["host"] = {"isa": detect_isa(), "cpu": platform.processor() or platform.machine(),
                       "onnxruntime": ort.__version__, "torch": torch.__version__, "threads": THREADS, "batch": 1}
    RESULTS.mkdir(exist_ok=True)
    JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")


def table(results: dict) -> str:
    host = results["host"]
    lines = ["# Quantization on the host: when int8 pays", "",
             f"ONNX Runtime {host['onnxruntime']}, CPU ISA {host['isa']}, {host['threads']} thread, batch 1. "
             "Reproduce: `flock /tmp/edgekd-cpu.lock python benchmarks/quantization_host.py`.", "",
             "## A. Latency at 224x224 (p50 ms), size, agreement with fp32", "",
             "Random weights (latency does not depend on them) except tf_efficientnet_lite0 (real ImageNet weights; "
             "its agreement is top-1 agreement with fp32 on real images). Speed-up is fp32 p50 / form p50.", "",
             "| model | form | preset | p50 ms | speed-up | size MB | agreement |", "|---|---|---|---:|---:|---:|---:|"]
    for name, entry in results.get("latency", {}).items():
        base = entry["forms"][0]["p50_ms"]
        for form in entry["forms"]:
            if "error" in form:
                lines.append(f"| {name} | {form['precision']} | {form['preset']} | failed: "
                             f"{form['error'].split(' (')[1].split(')')[0]} | | | |")
                continue
            lines.append(f"| {name} | {form['precision']} | {form['preset']} | {form['p50_ms']:.2f} | "
                         f"{base / form['p50_ms']:.2f}x | {form['size_mb']:.1f} | {100 * form['agreement']:.1f}% |")
    lines += ["", f"## B. The accuracy guard on students trained on Fashion-MNIST ({GUARD_SIZE} px)", "",
              "`guarded_quantize(search=True, max_accuracy_drop=1 point)`: every preset of the ISA; a form whose "
              "drop exceeds the guard keeps its most sensitive nodes in float; the fastest passing form ships only "
              "if it beats fp32.", "",
              "| student | fp32 top-1 | fp32 ms | form (preset) | nodes in float | top-1 | drop (pts) | agreement | "
              "ms | passed |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for name, entry in results.get("guard", {}).items():
        for trial in entry["trials"]:
            if trial["error"]:
                lines.append(f"| {name} | | | {trial['precision']} ({trial['preset']['name']}) | | | | | | failed |")
                continue
            ms = f"{trial['latency_ms']:.2f}" if trial["latency_ms"] else "-"
            lines.append(f"| {name} | {100 * entry['fp32_top1']:.2f}% | {entry['fp32_latency_ms']:.2f} | "
                         f"{trial['precision']} ({trial['preset']['name']}) | {len(trial['excluded_nodes'])} | "
                         f"{100 * trial['top1']:.2f}% | {trial['accuracy_drop']:.2f} | {100 * trial['agreement']:.1f}% "
                         f"| {ms} | {'yes' if trial['passed'] else 'no'} |")
        lines.append(f"| **{name} ships** | | | **{entry['precision']}** | | | | | | {entry['reason']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", nargs="?", default="all", choices=("all", "latency", "guard", "table"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(2)
    results = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    if args.stage in ("all", "latency"):
        latency_stage(results)
    if args.stage in ("all", "guard"):
        guard_stage(results)
    (RESULTS / "quantization_host.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
