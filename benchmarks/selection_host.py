"""Benchmark: candidate latencies on the host profile, the selection for a ViT-B teacher at 10 ms, and how stable
edgekd's timing routine is.

    flock /tmp/edgekd-cpu.lock .venv/bin/python benchmarks/selection_host.py [--repeats 5] [--budget 10ms]

Writes benchmarks/results/selection_host.{json,md}. Every figure is measured here with
edgekd.select.latency.measure_onnx (no cache: a fresh cache folder is used unless --cache-dir is given).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from edgekd.artifacts import write_json_atomic, write_text_atomic
from edgekd.select.candidates import TimingConfig, deployment_forms, measure_for_teacher, resolve_budget
from edgekd.select.latency import measure_onnx
from edgekd.select.profiles import load_profile
from edgekd.select.rule import RULE, Candidate, format_table, parse_budget, select_student
from edgekd.distill.students import build_student
from edgekd.record import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER = "vit_base_patch16_224"
STABILITY_MODELS = ("mobilenetv3_small_100", "efficientnet_b0", "deit_tiny_patch16_224")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="10ms")
    parser.add_argument("--repeats", type=int, default=5, help="repeated measurements per form for the spread")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    profile = load_profile("host")
    timing = TimingConfig()
    budget_ms = resolve_budget(parse_budget(args.budget), TEACHER, profile, num_classes=1000, image_size=(224, 224),
                               cache_dir=args.cache_dir, timing=timing).ms
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-cache-") as fresh:
        started = time.perf_counter()
        candidates = measure_for_teacher(TEACHER, profile, num_classes=1000, image_size=(224, 224),
                                         cache_dir=args.cache_dir or Path(fresh), timing=timing)
        selection_s = time.perf_counter() - started
        started = time.perf_counter()
        measure_for_teacher(TEACHER, profile, num_classes=1000, image_size=(224, 224),
                            cache_dir=args.cache_dir or Path(fresh), timing=timing)
        cached_s = time.perf_counter() - started
    selection = select_student(candidates, budget_ms)
    stability_names = (*STABILITY_MODELS, selection.chosen.model_name)
    stability = [stability_of(name, profile, args.repeats, timing) for name in dict.fromkeys(stability_names)]
    load_after = os.getloadavg()
    payload = {
        "machine": {"cpu": cpu_model(), "cores": profile.threads, "platform": platform.platform(),
                    "onnxruntime": ort.__version__, "isa": profile.isa,
                    "load_average_1_5_15_before": [round(v, 2) for v in load_before],
                    "load_average_1_5_15_after": [round(v, 2) for v in load_after]},
        "profile": profile.to_dict(), "teacher": TEACHER, "budget_ms": budget_ms, "timing": timing.__dict__,
        "first_selection_seconds": round(selection_s, 1), "cached_selection_seconds": round(cached_s, 2),
        "candidates": [candidate_row(c) for c in candidates],
        "selection": {"chosen": selection.chosen.model_name, "precision": selection.precision,
                      "reason": selection.reason, "rule": RULE},
        "stability": stability,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "selection_host.json", payload)
    write_text_atomic(RESULTS / "selection_host.md", markdown(payload, candidates, budget_ms, profile.precisions))
    print(markdown(payload, candidates, budget_ms, profile.precisions))


def candidate_row(candidate: Candidate) -> dict:
    return {"model": candidate.model_name, "family": candidate.family, "params": candidate.params,
            "macs": candidate.macs, "top1": candidate.top1, "top1_source": candidate.top1_source,
            "error": candidate.error,
            "forms": {m.precision: ({"p50_ms": round(m.p50_ms, 3), "p90_ms": round(m.p90_ms, 3),
                                     "runs": m.stats.runs} if m.stats else {"error": m.error})
                      for m in candidate.measurements}}


def stability_of(name: str, profile, repeats: int, timing: TimingConfig) -> dict:
    """Repeat the timing routine on the same files (fresh session each time): how far apart are the medians?"""
    model = build_student(name, 1000, (224, 224)).eval()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as work:
        forms = deployment_forms(model, (3, 224, 224), profile.precisions, profile.isa, Path(work), "m")
        for precision, form in forms.items():
            if isinstance(form, str):
                continue
            p50s = [measure_onnx(form, (3, 224, 224), threads=profile.threads, warmup=timing.warmup,
                                 min_runs=timing.min_runs, min_seconds=timing.min_seconds,
                                 max_seconds=timing.max_seconds).p50_ms for _ in range(repeats)]
            median = statistics.median(p50s)
            rows[precision] = {"p50s_ms": [round(v, 3) for v in p50s], "median_ms": round(median, 3),
                               "spread_pct": round(100 * (max(p50s) - min(p50s)) / median, 1),
                               "cv_pct": round(100 * statistics.pstdev(p50s) / statistics.mean(p50s), 1)}
    return {"model": name, "forms": rows}


def markdown(payload: dict, candidates: list[Candidate], budget_ms: float, precisions: tuple[str, ...]) -> str:
    machine = payload["machine"]
    lines = [
        "# Candidate selection on the host profile",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} threads, ISA preset {machine['isa']}, onnxruntime "
        f"{machine['onnxruntime']}. Teacher {payload['teacher']} at 224x224, 1000 classes, budget {budget_ms:g} ms "
        f"(p90). Timing: {payload['timing']}. Reproduce: `flock /tmp/edgekd-cpu.lock .venv/bin/python "
        "benchmarks/selection_host.py`.",
        "",
        f"Load average (1/5/15 min) before: {machine['load_average_1_5_15_before']}, after: "
        f"{machine['load_average_1_5_15_after']} (the machine is shared; 2.0 means both cores were busy).",
        "",
        f"First selection (export + quantize + time every candidate): {payload['first_selection_seconds']} s; "
        f"the same selection again (cache): {payload['cached_selection_seconds']} s.",
        "",
        "```",
        format_table(candidates, budget_ms, precisions, chosen=payload["selection"]["chosen"]),
        "```",
        "",
        f"Rule: {payload['selection']['rule']}.",
        "",
        f"Chosen: {payload['selection']['reason']}",
        "",
        "## Stability of the timing routine",
        "",
        "Each form timed repeatedly (a fresh session each time); spread = (max - min) / median of the p50s.",
        "",
        "| model | precision | p50 of each repeat (ms) | median (ms) | spread | CV |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["stability"]:
        for precision, s in row["forms"].items():
            lines.append(f"| {row['model']} | {precision} | {', '.join(f'{v:.2f}' for v in s['p50s_ms'])} | "
                         f"{s['median_ms']:.2f} | {s['spread_pct']:.1f}% | {s['cv_pct']:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
