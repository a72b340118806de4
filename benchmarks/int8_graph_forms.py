"""Benchmark: how the graph's form decides what int8 gains on the host (1 thread, batch 1, 224 px).

    flock /tmp/edgekd-cpu.lock .venv/bin/python benchmarks/int8_graph_forms.py [--repeats 5] [--table]

Writes benchmarks/results/int8_graph_forms.{json,md}. Two questions, each answered with edgekd's own export,
preparation and presets, every form of a model timed round-robin with edgekd's measure_onnx (so they share the
machine's state; the figure is the median over the repeats of each form's p50) and profiled by op type:

1. Spatial means as global average pools (edgekd.deploy.quantize prepares every graph so): squeeze-excite's
   `x.mean((2, 3), keepdim=True)` exports as ReduceMean, which ORT's quantizer leaves in float; as GlobalAveragePool
   (the same arithmetic) it runs in int8. MobileNetV3-large and EfficientNet-B0, prepared with and without it.
2. Attention fusion for DeiT-tiny (issue #11's 2x target): edgekd exports timm's attention as it is (one qkv Linear,
   scaled_dot_product_attention), which no onnxruntime.transformers fusion recognises. Here the same weights are also
   exported as edgekd.deploy.attention_fusion exports them for dynamic int8, in the shape ORT's BERT/ViT attention
   fusion matches (separate q, k, v Linears, explicit
   softmax(q.k^T/sqrt(d)).v, the block's residual added after the branch), fused into com.microsoft Attention with
   plain LayerNormalization kept (its SkipLayerNormalization fusion made fp32 slower here), and quantized with
   edgekd's presets: dynamic int8 turns Attention into QAttention.

Random weights, with non-zero Linear biases for DeiT (a trained model's; timm's zeros get merged): latency does not
depend on the values.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from torch import nn

from edgekd.artifacts import write_json_atomic, write_text_atomic
from edgekd.deploy import quantize
from edgekd.deploy.attention_fusion import FusableBlock, fuse_attention
from edgekd.deploy.export import export_onnx
from edgekd.deploy.quantize import (DYNAMIC_MATMUL, U8S8, U8S8_MATMUL, prepare_for_quantization, quantize_onnx)
from edgekd.deploy.verify import onnx_logits
from edgekd.record import cpu_model, int8_instructions
from edgekd.select.latency import measure_onnx

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (3, 224, 224)
SE_MODELS = ("mobilenetv3_large_100", "efficientnet_b0")
TRANSFORMER = "deit_tiny_patch16_224"
ISA = "avx512_vnni"


def op_profile(path: Path, runs: int = 30) -> dict[str, float]:
    """Mean ms per inference by op type (ORT's own profiler, 1 thread), largest first."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.enable_profiling = 1, 1, True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, *SHAPE), np.float32)}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return {op: round(ms, 3) for op, ms in totals.most_common()}


def random_images(count: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, *SHAPE)).astype(np.float32)


def pooling_forms(name: str, work: Path) -> tuple[dict[str, Path], dict]:
    torch.manual_seed(0)
    images = random_images(64)
    fp32 = export_onnx(timm.create_model(name).eval(), work / f"{name}.onnx", SHAPE)
    forms = {"fp32": fp32}
    for label, rewrite in (("spatial means as GlobalAveragePool (edgekd)", True), ("ReduceMean kept", False)):
        # edgekd's preparation, with its one rewrite switched off for the comparison
        with mock.patch.object(quantize, "_spatial_means_as_global_pools",
                               quantize._spatial_means_as_global_pools if rewrite else lambda model: 0):
            prepared = prepare_for_quantization(fp32, work / f"{name}-{rewrite}-prepared.onnx", images[:4])
        forms[f"int8_static {U8S8.name}, {label}"] = quantize_onnx(
            prepared, work / f"{name}-{rewrite}.onnx", "int8_static", isa=ISA, calibration=images, preset=U8S8,
            prepared=True)
    means = {label: collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)["ReduceMean"]
             for label, path in forms.items()}
    return forms, {"reduce_means": means}


def attention_forms(work: Path) -> tuple[dict[str, Path], dict]:
    torch.manual_seed(0)
    model = timm.create_model(TRANSFORMER, num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.bias, std=0.02)  # timm initialises biases to 0; identical ones get merged
    images = random_images(64)
    with torch.no_grad():
        reference = model(torch.from_numpy(images[:8])).numpy()
    plain = export_onnx(model, work / "plain.onnx", SHAPE)
    heads, width = model.blocks[0].attn.num_heads, model.embed_dim
    model.blocks = nn.Sequential(*[FusableBlock(block) for block in model.blocks])
    split = export_onnx(model, work / "split.onnx", SHAPE)
    fusions = fuse_attention(split, work / "fused.onnx", heads, width)
    forms = {"fp32 (edgekd's export)": plain, "fp32 (attention fused)": work / "fused.onnx"}
    for label, source in (("edgekd's export", plain), ("attention fused", work / "fused.onnx")):
        prepared = prepare_for_quantization(source, work / f"{source.stem}-prepared.onnx", images[:4])
        for preset in (DYNAMIC_MATMUL, U8S8_MATMUL):
            precision = "int8_dynamic" if preset.mode == "dynamic" else "int8_static"
            target = work / f"{source.stem}-{preset.name}.onnx"
            quantize_onnx(prepared, target, precision, isa=ISA, calibration=images, preset=preset, prepared=True)
            forms[f"{precision} {preset.name} ({label})"] = target
    logit_diff = {name: float(np.abs(onnx_logits(path, images[:8], batch_size=1) - reference).max())
                  for name, path in forms.items()}
    return forms, {"fusions": fusions, "max_abs_logit_diff_vs_torch": logit_diff}


def timed(forms: dict[str, Path], repeats: int) -> dict:
    """Round-robin p50s, their medians, and the op-type profile of every form but fp32's."""
    p50s: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, path in forms.items():
            p50s[name].append(measure_onnx(path, SHAPE, threads=1, min_seconds=2.0).p50_ms)
    return {"p50_ms_per_repeat": p50s, "p50_ms": {name: statistics.median(v) for name, v in p50s.items()},
            "op_profile_ms": {name: op_profile(path) for name, path in forms.items() if "int8" in name}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds over each model's forms")
    parser.add_argument("--table", action="store_true", help="only re-write the .md from the committed .json")
    args = parser.parse_args()
    json_path = RESULTS / "int8_graph_forms.json"
    if args.table:
        write_text_atomic(RESULTS / "int8_graph_forms.md", render(json.loads(json_path.read_text())))
        return
    results = {"host": {"onnxruntime": ort.__version__, "torch": torch.__version__, "timm": timm.__version__,
                        "cpu": cpu_model(), "cpu_flags": int8_instructions(), "isa": ISA,
                        "date": time.strftime("%Y-%m-%d"), "threads": 1, "batch": 1},
               "repeats": args.repeats, "pooling": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in SE_MODELS:
            forms, facts = pooling_forms(name, Path(folder))
            results["pooling"][name] = {**timed(forms, args.repeats), **facts}
        forms, facts = attention_forms(Path(folder))
        results["attention"] = {"model": TRANSFORMER, **timed(forms, args.repeats), **facts}
    write_json_atomic(json_path, results)
    write_text_atomic(RESULTS / "int8_graph_forms.md", render(results))
    print(render(results))


def _flags(host: dict) -> str:
    return f" ({', '.join(host['cpu_flags'])})" if host.get("cpu_flags") else ""


def _profile_lines(profiles: dict[str, dict[str, float]]) -> list[str]:
    return [f"- {name}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in list(profile.items())[:9])
            for name, profile in profiles.items()]


def render(results: dict) -> str:
    host = results["host"]
    lines = ["# How the graph's form decides what int8 gains (224x224, 1 thread, batch 1)", "",
             f"Measured on {host['cpu']}{_flags(host)}, {host.get('date', 'date unrecorded')}. "
             f"onnxruntime {host['onnxruntime']}, torch {host['torch']}, timm {host['timm']}, preset ISA "
             f"{host['isa']}. Reproduce: `flock /tmp/edgekd-cpu.lock .venv/bin/python benchmarks/int8_graph_forms.py`."
             f" p50 is the median over {results['repeats']} round-robin repeats of each form's p50, all forms of a "
             "model timed in the same rounds. Random weights.", "",
             "## 1. Squeeze-excite's spatial means as global average pools", "",
             "| model | form | ReduceMean nodes | p50 ms | speed-up vs fp32 |", "|---|---|---:|---:|---:|"]
    for name, entry in results["pooling"].items():
        base = entry["p50_ms"]["fp32"]
        for form, ms in entry["p50_ms"].items():
            lines.append(f"| {name} | {form} | {entry['reduce_means'][form]} | {ms:.2f} | {base / ms:.2f}x |")
    lines += ["", "Where the int8 forms spend their time (ms per image by op type, ORT's profiler):", ""]
    for name, entry in results["pooling"].items():
        lines += _profile_lines({f"{name}, {form}": p for form, p in entry["op_profile_ms"].items()})
    attention = results["attention"]
    medians = attention["p50_ms"]
    base, fused = medians["fp32 (edgekd's export)"], medians["fp32 (attention fused)"]
    lines += ["", f"## 2. Attention fusion ({attention['model']})", "",
              f"Fusions applied: {attention['fusions']}.",
              "",
              "| form | p50 ms | vs fp32 (edgekd's export) | vs fp32 (attention fused) | max logit diff vs torch |",
              "|---|---:|---:|---:|---:|"]
    for name, ms in medians.items():
        lines.append(f"| {name} | {ms:.2f} | {base / ms:.2f}x | {fused / ms:.2f}x | "
                     f"{attention['max_abs_logit_diff_vs_torch'][name]:.3g} |")
    lines += ["", "Where the dynamic int8 forms spend their time (ms per image by op type, ORT's profiler):", ""]
    lines += _profile_lines({k: v for k, v in attention["op_profile_ms"].items() if "dynamic" in k})
    dynamic, fused_dynamic = (medians[f"int8_dynamic dynamic_matmul ({label})"]
                              for label in ("edgekd's export", "attention fused"))
    fused_static = medians["int8_static u8s8_qdq_weight_matmul (attention fused)"]
    static = medians["int8_static u8s8_qdq_weight_matmul (edgekd's export)"]

    def change(before: float, after: float) -> str:
        return f"{abs(1 - after / before):.0%} {'faster' if after < before else 'slower'}"

    lines += ["", f"**Reading.** Fused attention (com.microsoft Attention; QAttention in dynamic int8) runs dynamic "
              f"int8 in {fused_dynamic:.2f} ms against {dynamic:.2f} for edgekd's export "
              f"({change(dynamic, fused_dynamic)}), {base / fused_dynamic:.2f}x edgekd's fp32 export; fp32 runs "
              f"{fused:.2f} ms fused ({change(base, fused)})"
              f", so like for like the fused int8 is {fused / fused_dynamic:.2f}x its fp32, "
              f"against {base / dynamic:.2f}x unfused. Static int8 of the fused graph runs {fused_static:.2f} ms "
              f"({change(static, fused_static)} than unfused static): the QDQ quantizer has no int8 Attention, so the "
              "q/k/v projections stay in float. What the weight MatMuls save, the float ops around them (attention "
              "core, Gelu, LayerNorm, the patch Conv) cap: see the profile. So edgekd ships fp32 and static int8 "
              "from its plain export and quantizes dynamic int8 from the fused graph (edgekd.deploy.attention_fusion;"
              " the guard's preset is then named dynamic_matmul_attention_fused). The contrib ops run in "
              "onnxruntime (Python, Node), onnxruntime-web's wasm build (tests/test_js_apps.py runs such a bundle "
              "in Node and in Chromium) and the full mobile packages."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
