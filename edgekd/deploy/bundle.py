"""The deployable bundle: model.onnx (+ model.ort), preprocess.json and manifest.json, written whole or not at all.

The folder is assembled in a temporary sibling and renamed into place at the end, so an app never sees a
bundle whose model, preprocessing and manifest disagree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from edgekd import __version__
from edgekd.artifacts import (MANIFEST_NAME, remove_stale_staging, sha256_file, staging_prefix,
                              write_json_atomic)
from edgekd.select.candidates import table_timing
from edgekd.data import LoadedData, evaluation_read
from edgekd.errors import EdgekdError, first_line
from edgekd.deploy.attention_fusion import export_attention_fused
from edgekd.deploy.export import export_with_parity
from edgekd.select.latency import measure_onnx
from edgekd.deploy.quantize import CALIBRATION_IMAGES, quantize_onnx
from edgekd.deploy.guard import GuardConfig, QuantDecision, Timing, guarded_quantize
from edgekd.deploy.raw_input import (
    MIN_AGREEMENT,
    RAW_MODEL_NAME,
    RawInputCheck,
    check_with_preprocessing,
    synthetic_images,
    tie_margin,
    with_preprocessing,
)
from edgekd.deploy.raw_input import OPSET as RAW_OPSET
from edgekd.runtime import MODEL_NAME, PREPROCESS_NAME
from edgekd.distill.students import load_student
from edgekd.types import Artifact, Preprocess, StudentCheckpoint
from edgekd.deploy.verify import (
    INPUT_NAME,
    OUTPUT_NAME,
    AccuracyDrop,
    EvalSet,
    OnnxMetrics,
    Parity,
    Reference,
    accuracy_drop,
    metrics_from_predictions,
    onnx_logits,
    precision_of_graph,
    preprocess_records,
    sample_indices,
)

log = logging.getLogger(__name__)

ORT_MODEL_NAME = "model.ort"
APPS = Path(__file__).parent / "apps"
# What an app embeds beside the raw-image model: bundle path -> template under edgekd/deploy/apps
APP_FILES = {"predict.mjs": "node/predict.mjs", "package.json": "node/package.json", "web/index.html": "web/index.html"}
BUNDLE_FILES = frozenset({MODEL_NAME, PREPROCESS_NAME, MANIFEST_NAME, RAW_MODEL_NAME, *APP_FILES})
PARITY_IMAGES = 64


@dataclass(frozen=True)
class BundleOptions:
    """How to build a bundle; the defaults suit a desktop x86 CPU."""

    isa: str = "avx2"
    precisions: tuple[str, ...] = ("int8_static", "int8_dynamic")  # may ship instead of fp32 (int8 needs data)
    guard: GuardConfig = field(default_factory=GuardConfig)
    search: bool = False  # try every quantization preset of the ISA, not only its defaults
    opset: int = 17
    ort_format: bool = False  # also write model.ort for onnxruntime-mobile
    threads: int = 1  # for timing: int8 ships only where it beats fp32 at this thread count
    time_models: bool = True
    latency_table: Path | None = None  # a probe pack's table: int8 ships where the device's figures say it pays
    timing_seconds: float = 1.0
    calibration_images: int = CALIBRATION_IMAGES
    validation_images: int | None = 1000
    overwrite: bool = False


@dataclass(frozen=True)
class BundleResult:
    path: Path
    precision: str
    parity: Parity
    fp32: OnnxMetrics
    shipped: OnnxMetrics
    latency_ms: float | None
    decision: QuantDecision | None


def bundle_from_checkpoint(checkpoint: StudentCheckpoint, out_dir: Path, data: LoadedData | None,
                           options: BundleOptions = BundleOptions()) -> BundleResult:
    """Export, verify, quantize under the accuracy guard and write the bundle for a trained student.

    Without data the bundle ships fp32: int8 and fp16 ship only when checked on real images.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        foreign = _not_a_bundles(out_dir)
        if foreign:  # --overwrite must never empty a student's, a run's or an app's folder
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise EdgekdError(f"{out_dir} is not a bundle (it holds {shown}); pass an empty or new folder as --out "
                              "(--overwrite replaces a bundle only)")
        if not options.overwrite:
            raise EdgekdError(f"{out_dir} already exists; remove it, pass another --out, or pass --overwrite")
    model = load_student(checkpoint)
    evalset = preprocess_records(data.val, checkpoint.preprocess, options.validation_images) if data else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir), suffix=".tmp", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        with tempfile.TemporaryDirectory(prefix="edgekd-export-") as work:
            result = _build(model, checkpoint, Path(work), staging, data, evalset, options)
        _move_into_place(staging, out_dir, options.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundle: %s (%s) -> %s", MODEL_NAME, result.precision, out_dir)
    return replace(result, path=out_dir)


def _build(model: torch.nn.Module, checkpoint: StudentCheckpoint, work: Path, staging: Path,
           data: LoadedData | None, evalset: EvalSet | None, options: BundleOptions) -> BundleResult:
    pre = checkpoint.preprocess
    fp32_path = work / "model.fp32.onnx"
    check = evalset.images[:PARITY_IMAGES] if evalset else None
    _, parity = export_with_parity(model, fp32_path, pre.input_size, opset=options.opset, check_inputs=check)
    log.info("export: parity max |logit diff| %.2g, top-1 agreement %.1f%% on %d image(s)",
             parity.max_abs_diff, 100 * parity.top1_agreement, parity.count)
    model_path = staging / MODEL_NAME
    decision, calibration_set = None, None
    # fp32's answers on the validation images, computed once: the guard, fp16's check and the manifest all use them
    reference = Reference.of(onnx_logits(fp32_path, evalset.images)) if evalset else None
    int8 = tuple(p for p in options.precisions if p.startswith("int8"))
    if evalset is not None and data is not None and int8:
        calibration_set = preprocess_records(data.train, pre, options.calibration_images)
        calibration = calibration_set.images
        timer, source = _timer(options, checkpoint.model_name, pre)
        # Dynamic int8 of a ViT/DeiT runs faster from the attention-fused graph (candidate selection and probe
        # packs time that form too: select.candidates.deployment_forms)
        fused = export_attention_fused(model, work / "model.fp32.fused.onnx", pre.input_size, opset=options.opset,
                                       check_inputs=check) if "int8_dynamic" in int8 else None
        decision = guarded_quantize(fp32_path, model_path, evalset=evalset, calibration=calibration, isa=options.isa,
                                    precisions=int8, guard=options.guard, search=options.search, timing=timer,
                                    latency_source=source, attention_fused=fused,
                                    times_files=options.latency_table is None, reference=reference)
        precision = decision.precision
    else:
        # fp16 needs no calibration, but it ships only when checked on real images (below); without them, fp32.
        precision = "fp16" if "fp16" in options.precisions and evalset is not None else "fp32"
        if "fp16" in options.precisions and evalset is None:
            log.warning("fp16 was asked for but there are no images to check it on: shipping fp32 (give --data)")
        quantize_onnx(fp32_path, model_path, precision)
    fp32_metrics = metrics_from_predictions(reference.predictions, evalset, reference.predictions) if reference \
        else OnnxMetrics(None, None, 0)
    shipped_answers = onnx_logits(model_path, evalset.images).argmax(1) if evalset else None
    shipped = metrics_from_predictions(shipped_answers, evalset, reference.predictions) if reference else \
        OnnxMetrics(None, None, 0)
    drop = accuracy_drop(reference, shipped_answers, evalset.labels) if reference else None
    failure = None
    if precision == "fp16" and drop is not None:  # fp16 is held to the guard int8 is
        failure = options.guard.failure(drop.points, shipped.agreement if shipped.agreement is not None else 0.0)
        if failure and drop.estimated:
            failure += " (no labels: estimated from fp32's probabilities)"
    if failure:
        log.warning("fp16 %s: shipping fp32", failure)
        precision, shipped = "fp32", fp32_metrics
        drop = accuracy_drop(reference, reference.predictions, evalset.labels)
        quantize_onnx(fp32_path, model_path, precision)
    latency = decision.latency_ms if decision else None
    if options.ort_format:
        write_ort_format(model_path, staging / ORT_MODEL_NAME)
    config = preprocess_json(pre, checkpoint.class_names)
    write_json_atomic(staging / PREPROCESS_NAME, config)
    raw_check = _write_raw_input_model(staging, config, data, options, precision)
    samples = {"validation": evalset.describe() if evalset else None,
               "calibration": calibration_set.describe() if calibration_set else None}
    write_json_atomic(staging / MANIFEST_NAME, _manifest(staging, checkpoint, options, parity, fp32_metrics, shipped,
                                                         drop, precision, latency, decision, samples, raw_check))
    return BundleResult(staging, precision, parity, fp32_metrics, shipped, latency, decision)


@dataclass(frozen=True)
class ShippedForm:
    """What a bundle's model.onnx is, from its manifest."""

    precision: str
    reason: str | None  # the accuracy guard's verdict
    int8_within_guard: bool  # some int8 form kept the accuracy (so fp32 shipped, if it did, because it was faster)


def read_shipped_form(bundle_dir: Path) -> ShippedForm:
    """From the bundle's manifest; for a bundle without one (or without its model's entry: a folder put together by
    hand), the precision its model's graph holds."""
    path = Path(bundle_dir) / MANIFEST_NAME
    entries = json.loads(path.read_text()) if path.is_file() else []
    model = next((e for e in entries if e.get("path") == MODEL_NAME), {})
    decision = model.get("metrics", {}).get("quantization") or {}
    precision = model.get("config", {}).get("precision") or precision_of_graph(Path(bundle_dir) / MODEL_NAME)
    return ShippedForm(str(precision), decision.get("reason"),
                       any(trial.get("passed") for trial in decision.get("trials", [])))


def preprocess_json(pre: Preprocess, labels: tuple[str, ...]) -> dict[str, Any]:
    """Everything an app needs to feed the model the pixels it was validated on."""
    return {**pre.to_dict(), "resize_shorter_side_to": int(pre.input_size[1] / pre.crop_pct),
            "channel_order": "L" if pre.channels == 1 else "RGB", "layout": "NCHW", "scale": 1 / 255,
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "output": "logits (apply softmax)",
            "model": MODEL_NAME, "labels": list(labels)}


def _write_raw_input_model(staging: Path, config: dict[str, Any], data: LoadedData | None,
                           options: BundleOptions, precision: str) -> RawInputCheck | str:
    """model_with_preprocessing.onnx (uint8 image in, probabilities out) for `config` (preprocess.json), written only
    when it agrees with the Python runtime on the validation images (on synthetic pictures for a bundle made without
    data). Returns the check, or why the file was not written."""
    raw = staging / RAW_MODEL_NAME
    try:
        with_preprocessing(staging / MODEL_NAME, config, raw)
    except (EdgekdError, onnx.checker.ValidationError, RuntimeError) as error:  # an opset the converter cannot lift
        log.warning("no %s: %s", RAW_MODEL_NAME, first_line(error))
        return f"not written: {first_line(error)}"
    if data is not None:
        indices, _ = sample_indices(data.val, options.validation_images)
        read = [evaluation_read(data.val, i) for i in indices]
        images, source = [image for image, _ in filter(None, read)], "validation images"
    else:
        images, source = synthetic_images(), "synthetic images (no --data)"
    check = check_with_preprocessing(raw, staging, images, source, margin=tie_margin(precision))
    if check.top1_agreement < MIN_AGREEMENT:
        raw.unlink()
        log.warning("no %s: its top-1 matches the Python runtime on %.1f%% of %s (needs %.0f%%)", RAW_MODEL_NAME,
                    100 * check.top1_agreement, source, 100 * MIN_AGREEMENT)
        return f"not written: top-1 agreement with edgekd.runtime {check.top1_agreement:.1%} on {source}"
    log.info("%s: top-1 equal to the Python runtime's on %.1f%% of %d %s", RAW_MODEL_NAME,
             100 * check.top1_agreement, check.images, source)
    if options.ort_format:
        write_ort_format(raw, raw.with_suffix(".ort"))
    for name, template in APP_FILES.items():  # Node.js predictor and browser page for the raw-image model
        (staging / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(APPS / template, staging / name)
    return check


def write_ort_format(onnx_path: Path, ort_path: Path) -> Path:
    """The ORT flatbuffer format onnxruntime-mobile loads. Only portable (basic) optimisations are baked in: the int8
    fusions (QDQ -> QLinearConv, ...) are saved as runtime optimisations ("Runtime" style of ORT's converter), which
    a minimal mobile build applies when it loads the file, and an EP such as XNNPACK or NNAPI still sees the QDQ
    groups it takes over. ONNX Runtime's full build runs the file as saved (tests/helpers/mobile.py)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.add_session_config_entry("optimization.minimal_build_optimizations", "save")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return ort_path


def _timer(options: BundleOptions, model_name: str, pre: Preprocess) -> tuple[Timing | None, str]:
    """How the guard learns whether int8 pays: timed here for the host, read from the device's latency table for
    a probe-pack profile, not at all for a probe profile without its table (the first passing form ships)."""
    if options.latency_table is not None:
        return table_timing(options.latency_table, model_name, pre.input_size), "p50 on the device, latency table"
    if not options.time_models:
        return None, "not timed"

    def p50_ms(path: Path, precision: str) -> float:
        return measure_onnx(path, pre.input_size, threads=options.threads, min_seconds=options.timing_seconds,
                            min_runs=10).p50_ms

    return p50_ms, f"p50 timed here, {options.threads} thread(s)"


def _manifest(folder: Path, checkpoint: StudentCheckpoint, options: BundleOptions, parity: Parity,
              fp32: OnnxMetrics, shipped: OnnxMetrics, drop: AccuracyDrop | None, precision: str,
              latency_ms: float | None,
              decision: QuantDecision | None, samples: dict[str, Any],
              raw_check: RawInputCheck | str) -> list[dict[str, Any]]:
    parent = str(checkpoint.weights_path)
    entries = [Artifact(stage="export", path=MODEL_NAME, sha256=sha256_file(folder / MODEL_NAME), parent=parent,
                        config={"model_name": checkpoint.model_name, "weights_sha256": sha256_file(
                            checkpoint.weights_path), "opset": options.opset, "precision": precision,
                            "isa": options.isa, "guard": asdict(options.guard), "search": options.search,
                            "edgekd": __version__, "onnxruntime": ort.__version__},
                        metrics={"parity": parity.to_dict(), "fp32": fp32.to_dict(), "shipped": shipped.to_dict(),
                                 # the shipped file against fp32: counted on labeled images, else estimated
                                 "accuracy_drop_points": drop.points if drop else None,
                                 "accuracy_drop_standard_error": drop.standard_error if drop else None,
                                 "accuracy_drop_estimated": drop.estimated if drop else None,
                                 "latency_p50_ms": latency_ms,
                                 "size_bytes": (folder / MODEL_NAME).stat().st_size,
                                 # the shipped file by its name in the bundle, not the scratch folder it was made in
                                 "quantization": {**decision.to_dict(), "path": MODEL_NAME} if decision else None,
                                 "images": samples,  # which images validated and calibrated it
                                 # why the raw-image model was not written
                                 **({"with_preprocessing": raw_check} if isinstance(raw_check, str) else {})})]
    entries += _ort_entry(folder, ORT_MODEL_NAME, MODEL_NAME)
    entries.append(Artifact(stage="export", path=PREPROCESS_NAME, sha256=sha256_file(folder / PREPROCESS_NAME),
                            parent=MODEL_NAME))
    raw = folder / RAW_MODEL_NAME
    entries += [Artifact(stage="export", path=name, sha256=sha256_file(folder / name), parent=RAW_MODEL_NAME)
                for name in APP_FILES if (folder / name).exists()]
    if isinstance(raw_check, RawInputCheck):
        entries.append(Artifact(stage="export", path=RAW_MODEL_NAME, sha256=sha256_file(raw), parent=MODEL_NAME,
                                config={"input": "uint8 [height, width, 3] RGB", "output": "probabilities [1, classes]",
                                        "opset": RAW_OPSET}, metrics={"against_python_runtime": raw_check.to_dict()}))
        entries += _ort_entry(folder, raw.with_suffix(".ort").name, RAW_MODEL_NAME)
    return [asdict(entry) for entry in entries]


def _ort_entry(folder: Path, name: str, parent: str) -> list[Artifact]:
    """The manifest entry of an .ort file (see write_ort_format), when the bundle has it."""
    if not (folder / name).exists():
        return []
    return [Artifact(stage="export", path=name, sha256=sha256_file(folder / name), parent=parent,
                     config={"format": "ort", "optimization": "basic"})]


def _not_a_bundles(folder: Path) -> list[str]:
    """What in `folder` a bundle does not hold (its files, their .ort forms, web/), by relative path."""
    foreign = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir() and name == "web":
            continue
        if path.is_file() and (name in BUNDLE_FILES or (name.endswith(".ort") and "/" not in name)):
            continue
        if any(str(parent) in foreign for parent in Path(name).parents):
            continue  # a foreign folder is named once, not file by file
        foreign.append(name)
    return foreign


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder to `out_dir`; an old bundle is swapped out only after the new one is complete."""
    if out_dir.exists():
        if not overwrite and any(out_dir.iterdir()):
            raise EdgekdError(f"{out_dir} appeared while exporting; remove it or pass --overwrite")
        old = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir), suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, out_dir)
