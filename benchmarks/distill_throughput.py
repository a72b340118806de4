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
  distill from random   edgekd's default for a student from random weights (edgekd.recipe.FROM_RANDOM): the batch's
                        images from the cache, and half a batch of mixups of them added, which the teacher answers live

It runs the real distillation step (edgekd.distill.train's wiring and loop), not a copy of it. Weights are
random: throughput does not depend on them (no pretrained weights can be downloaded here).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from edgekd.distill.losses import Objective, parse_loss_specs
from edgekd.distill.state import TeacherCache
from edgekd.distill.train import DistillConfig, DistillLoop, wire_models
from edgekd.models import create_model, preprocess_for
from edgekd.recipe import FROM_RANDOM
from edgekd.distill.train_utils import (SCRATCH_LR, Compute, cpu_has_native_bf16, make_optimizer, pick_device,
                                        warmup_cosine)
from edgekd.types import TeacherResult

RESULTS = Path(__file__).parent / "results"
CASES = {"distill ce+kd": "ce=1,kd=1", "distill ce+kd+fitnet": "ce=1,kd=1,fitnet=1",
         "distill ce+kd cached": "ce=1,kd=1", "distill from random": ",".join(FROM_RANDOM.losses)}


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
    parser.add_argument("--render", type=Path, default=None, help="only rewrite the .md and .png of this results JSON")
    args = parser.parse_args()
    if args.render:
        write_outputs(json.loads(args.render.read_text()), args.render)
        return

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
    record = {"command": " ".join(["python", "benchmarks/distill_throughput.py", *sys.argv[1:]]),
              "teacher": args.teacher, "student": args.student, "size": args.size, "classes": args.classes,
              "batch": batch, "steps": steps, "warmup": warmup, "device": describe(device),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    out = args.out or RESULTS / f"distill_throughput_{device.type}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    write_outputs(record, out)


def write_outputs(record: dict, out: Path) -> None:
    out.with_suffix(".md").write_text(table(record) + f"\n![images/s per case]({out.with_suffix('.png').name})\n")
    plot(record, out.with_suffix(".png"))
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
    # any temperature: only the speed is measured
    config = DistillConfig(losses=parse_loss_specs([losses]), temperature=4.0, augment=False, compile=compiled)
    if case == "distill from random":
        config = replace(config, losses=parse_loss_specs([losses], list(FROM_RANDOM.loss_options)),
                         temperature=FROM_RANDOM.temperature, mix=FROM_RANDOM.mix, mix_extra=FROM_RANDOM.mix_extra)
    objective = Objective(config.losses, config.temperature)
    hinted, tapped, _ = wire_models(student, preprocess_for(student, size), [teacher_model], [teacher], objective,
                                    config, compute, teacher_compute)
    optimizer = make_optimizer(hinted.student, SCRATCH_LR, config.weight_decay, extra=hinted.adapters)
    scheduler = warmup_cosine(optimizer, 10_000, 0.0)
    model = torch.compile(hinted) if compiled else hinted
    with tempfile.TemporaryDirectory(prefix="edgekd-teacher-cache-") as scratch:  # the disk cache, as --cache-teacher
        cached = case.endswith("cached") or case == "distill from random"
        cache = TeacherCache(Path(scratch), batch, 1) if cached else None
        loop = DistillLoop(model, tapped, objective, optimizer, scheduler, config, compute, teacher_compute, cache,
                           10_000)
        batch_tuple = (torch.randn(batch, 3, *size), torch.randn(batch, 3, *size),
                       torch.randint(0, args.classes, (batch,)), torch.arange(batch))
        # the loop's own mixing (DistillLoop.mixed: none outside the mixed case), as its epochs call it every step
        return measure(case, compute, lambda: loop.step(loop.mixed(batch_tuple, 1, 0), 1, 0.5), batch, steps, warmup,
                       compiled)


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
    try:
        name = next(line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = f"{platform.machine()} CPU"
    native = ", native bf16" if cpu_has_native_bf16() else ""
    return f"{name} ({torch.get_num_threads()} threads{native})"


def table(record: dict) -> str:
    """Markdown: each case's throughput, and its step time against the teacher's forward pass in the same precision."""
    lines = [f"# Distillation throughput: {record['teacher']} -> {record['student']} at {record['size']}px",
             "", f"Device: {record['device']}; torch {record['torch']}; batch {record['batch']}; median of "
             f"{record['steps']} steps after {record['warmup']} warm-up steps. Command: `{record['command']}`.", "",
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
    lines += ["", "## What limits it", ""] + findings(record)
    return "\n".join(lines) + "\n"


def findings(record: dict) -> list[str]:
    """Per setting: the teacher's share of a distillation step, and what caching the teacher would save."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in record["rows"]):
        rows = {r["case"]: r for r in record["rows"] if r["setting"] == setting and not r["compiled"]}
        if not {"teacher forward", "distill ce+kd", "distill ce+kd cached"} <= set(rows):
            continue
        teacher, step = rows["teacher forward"]["step_ms"], rows["distill ce+kd"]["step_ms"]
        student = rows["distill ce+kd cached"]["step_ms"]
        hints = rows.get("distill ce+kd+fitnet")
        extra = f"; feature hints change the step time by {100 * (hints['step_ms'] / step - 1):+.0f}%" if hints else ""
        mixed = rows.get("distill from random")
        extra += (f"; the default from random weights (cached, with half a batch of mixups the teacher answers live) "
                  f"takes {mixed['step_ms']:.0f} ms, {mixed['step_ms'] / student:.1f}x the cached step and "
                  f"{mixed['step_ms'] / step:.2f}x the uncached one") if mixed else ""
        out.append(f"* **{setting}** (student {rows['distill ce+kd']['precision']}, teacher "
                   f"{rows['distill ce+kd'].get('teacher_precision', '')}): the teacher's forward pass is "
                   f"{min(100.0, 100 * teacher / step):.0f}% of a ce+kd step ({teacher:.0f} of {step:.0f} ms) and the "
                   f"student's forward/backward/update the rest; a cached teacher makes the step "
                   f"{step / student:.1f}x faster{extra}.")
    return out


def plot(record: dict, path: Path) -> None:
    """Images/s per case, one bar group per precision setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in record["rows"]))
    cases = list(dict.fromkeys(r["case"] + (" (compiled)" if r["compiled"] else "") for r in record["rows"]))
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.35 * len(cases) * len(settings)))
    height = 0.8 / len(settings)
    for k, setting in enumerate(settings):
        rows = {r["case"] + (" (compiled)" if r["compiled"] else ""): r for r in record["rows"]
                if r["setting"] == setting}
        ys = [i + k * height for i in range(len(cases))]
        ax.barh(ys, [rows[c]["images_per_s"] if c in rows else 0 for c in cases], height, label=setting)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (higher is better)")
    ax.set_title(f"{record['teacher']} -> {record['student']}, {record['size']}px, batch {record['batch']}\n"
                 f"{record['device']}", fontsize=9)
    ax.legend(title="precision setting", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
