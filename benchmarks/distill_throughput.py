"""Benchmark: how fast does distillation run, and what limits it?

A ViT-B/16 teacher into the student edgekd picks for it under a 10 ms budget on the host profile
(mobilenetv4_conv_medium, see selection_host.md), at 224x224. Measured on whatever device this runs on:

    python benchmarks/distill_throughput.py                      # cuda when there is one, else cpu
    python benchmarks/distill_throughput.py --device cpu --batch 16 --steps 5

Cases, each timed per step (median of `--steps` after `--warmup`), with the inputs coming from host memory as a
data loader would deliver them:
  teacher forward       the teacher alone, inference mode (the floor any distillation step pays)
  distill ce+kd         teacher forward + student forward/backward + AdamW step (edgekd's default losses)
  distill ce+kd+fitnet  the same with feature hints (teacher taps, adapters)
  distill ce+kd cached  teacher outputs from the cache (edgekd --cache-teacher): what the student step costs alone

It runs the real distillation step (edgekd.distill.train's wiring and loop), not a copy of it. Weights are
random: throughput does not depend on them (no pretrained weights can be downloaded here).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from edgekd.distill.losses import Objective, parse_loss_specs
from edgekd.distill.state import TeacherCache
from edgekd.distill.train import DistillConfig, _Loop, _wire
from edgekd.models import create_model, preprocess_for
from edgekd.train_utils import Compute, make_optimizer, pick_device, warmup_cosine
from edgekd.types import TeacherResult

RESULTS = Path(__file__).parent / "results"
CASES = {"distill ce+kd": "ce=1,kd=1", "distill ce+kd+fitnet": "ce=1,kd=1,fitnet=1", "distill ce+kd cached": "ce=1,kd=1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="vit_base_patch16_224")
    parser.add_argument("--student", default="mobilenetv4_conv_medium")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 16 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 20 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 CUDA, 2 CPU)")
    parser.add_argument("--precisions", default="fp32,bf16,auto",
                        help="comma-separated: fp32, bf16 (teacher and student), auto (edgekd's default choice)")
    parser.add_argument("--compile", action="store_true", help="also time the student under torch.compile")
    parser.add_argument("--out", type=Path, default=None, help="default: results/distill_throughput_<device>.json")
    args = parser.parse_args()

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (128 if cuda else 16)
    steps, warmup = args.steps or (20 if cuda else 5), args.warmup or (5 if cuda else 2)
    rows = []
    for precision in args.precisions.split(","):
        student = Compute.choose(device, precision)
        teacher = Compute.choose(device, precision, inference=True)
        rows.append(time_teacher(args, teacher, batch, steps, warmup) | {"setting": precision})
        print(json.dumps(rows[-1]), flush=True)
        for case, losses in CASES.items():
            for compiled in (False, True) if args.compile else (False,):
                row = time_distill(args, student, teacher, batch, steps, warmup, case, losses, compiled)
                rows.append(row | {"setting": precision, "teacher_precision": teacher.describe()})
                print(json.dumps(rows[-1]), flush=True)
    record = {"teacher": args.teacher, "student": args.student, "size": args.size, "classes": args.classes,
              "batch": batch, "steps": steps, "warmup": warmup, "device": describe(device),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    out = args.out or RESULTS / f"distill_throughput_{device.type}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(record))
    print(table(record))


def time_teacher(args, compute: Compute, batch: int, steps: int, warmup: int) -> dict:
    teacher = compute.prepare(create_model(args.teacher, args.classes, (args.size, args.size))).eval()
    inputs = torch.randn(batch, 3, args.size, args.size)

    def step() -> None:
        with torch.inference_mode(), compute.autocast():
            teacher(compute.inputs(inputs))

    return measure("teacher forward", compute, step, batch, steps, warmup, compiled=False)


def time_distill(args, compute: Compute, teacher_compute: Compute, batch: int, steps: int, warmup: int, case: str,
                 losses: str, compiled: bool) -> dict:
    size = (args.size, args.size)
    teacher_model = create_model(args.teacher, args.classes, size)
    student = create_model(args.student, args.classes, size)
    teacher = TeacherResult(args.teacher, Path("unused"), args.classes, (), preprocess_for(teacher_model, size),
                            weights_source="random", fine_tuned=False, val_top1=None)
    config = DistillConfig(losses=parse_loss_specs([losses]), augment=False, compile=compiled)
    objective = Objective(config.losses, config.temperature)
    hinted, tapped, _ = _wire(student, preprocess_for(student, size), [teacher_model], [teacher], objective, config)
    hinted = compute.prepare(hinted)
    tapped = [teacher_compute.prepare(t).eval().requires_grad_(False) for t in tapped]
    optimizer = make_optimizer(hinted.parameters(), config.lr, config.weight_decay)
    scheduler = warmup_cosine(optimizer, 10_000, 0.0)
    model = torch.compile(hinted) if compiled else hinted
    cache = TeacherCache(batch, 1) if case.endswith("cached") else None
    loop = _Loop(model, tapped, objective, optimizer, scheduler, config, compute, teacher_compute, cache, 10_000)
    batch_tuple = (torch.randn(batch, 3, *size), torch.randn(batch, 3, *size),
                   torch.randint(0, args.classes, (batch,)), torch.arange(batch))
    return measure(case, compute, lambda: loop.step(batch_tuple, 1, 0.5), batch, steps, warmup, compiled)


def measure(case: str, compute: Compute, step, batch: int, steps: int, warmup: int, compiled: bool) -> dict:
    cuda = compute.device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"case": case, "precision": compute.describe(), "compiled": compiled, "step_ms": 1000 * median,
            "step_ms_min": 1000 * min(times), "step_ms_max": 1000 * max(times), "images_per_s": batch / median,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def table(record: dict) -> str:
    """Markdown: each case's throughput, and its step time against the teacher's forward pass in the same precision."""
    lines = [f"# Distillation throughput: {record['teacher']} -> {record['student']} at {record['size']}px",
             "", f"Device: {record['device']}; torch {record['torch']}; batch {record['batch']}; median of "
             f"{record['steps']} steps after {record['warmup']} warm-up steps. Command: "
             "`python benchmarks/distill_throughput.py` (arguments in the JSON).", "",
             "| setting | case | student | teacher | compiled | images/s | step ms (min-max) | x teacher forward "
             "| peak GPU GB |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    teacher_ms = {r["setting"]: r["step_ms"] for r in record["rows"] if r["case"] == "teacher forward"}
    for r in record["rows"]:
        memory = "-" if r["peak_gpu_memory_gb"] is None else f"{r['peak_gpu_memory_gb']:.1f}"
        student = "-" if r["case"] == "teacher forward" else r["precision"]
        teacher = r.get("teacher_precision", r["precision"])
        lines.append(f"| {r['setting']} | {r['case']} | {student} | {teacher} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['images_per_s']:.1f} | {r['step_ms']:.0f} ({r['step_ms_min']:.0f}-{r['step_ms_max']:.0f}) | "
                     f"{r['step_ms'] / teacher_ms[r['setting']]:.2f} | {memory} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
