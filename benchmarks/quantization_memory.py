"""Peak memory of each quantization step the accuracy guard can take, at a phone student's real input size.

Each step runs in a fresh process (its peak resident set is the process's own, `ru_maxrss`) on 256 calibration images
of 224 x 224 (edgekd's CALIBRATION_IMAGES; the sensitivity ranking's SENSITIVITY_IMAGES, 32): static int8 with each
calibration method (the ISA's default preset, corrections included, as the guard quantizes), the ranking of nodes to
keep in float (onnxruntime's qdq_loss_debug), and the count of extreme calibration images. Memory depends on the
graph and the input size, not on the weights: the models have random weights and the images are noise.

A child's address space is capped (--cap-gb, default 20) so that a step that would exhaust the machine fails with
MemoryError instead; its row then says "over the cap".

    python benchmarks/quantization_memory.py                     # -> benchmarks/results/quantization_memory.{json,md}
    PYTHONPATH=/path/to/an/older/checkout python benchmarks/quantization_memory.py --label before \
        --models efficientnet_b0,mobilenetv3_large_100              # the same steps with that checkout's edgekd
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = ("efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny")
STEPS = ("minmax", "average", "percentile", "entropy", "sensitivity", "extreme images")
SIZE = 224


def run_step(model_name: str, step: str, work: Path, size: int) -> None:
    """One step in this process; prints a JSON line with its peak resident set."""
    import numpy as np
    import torch

    from edgekd.deploy.export import export_onnx
    from edgekd.deploy.guard import SENSITIVITY_IMAGES
    from edgekd.deploy.quantize import CALIBRATION_IMAGES, prepare_for_quantization, quantize_onnx
    from edgekd.models import create_model

    fp32 = work / f"{model_name}.onnx"
    if not fp32.exists():
        torch.manual_seed(0)
        export_onnx(create_model(model_name, 10).eval(), fp32, (3, size, size))
    images = np.random.default_rng(0).standard_normal((CALIBRATION_IMAGES, 3, size, size), dtype=np.float32)
    int8 = work / f"{model_name}.minmax.onnx"
    if step == "sensitivity" and not int8.exists():  # the minmax step makes it, in a process of its own, so that
        # this one's peak is the ranking's
        subprocess.run([sys.executable, __file__, "--one", model_name, "minmax", str(work), "--size", str(size)],
                       check=True, capture_output=True)
    prepared = prepare_for_quantization(fp32, work / f"{model_name}.prepared.onnx", images[:8]) \
        if step == "sensitivity" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if step == "sensitivity":
        from edgekd.deploy.sensitivity import rank_sensitive_nodes
        rank_sensitive_nodes(prepared, int8, images[:SENSITIVITY_IMAGES])
    elif step == "extreme images":
        from edgekd.deploy.activation_peaks import extreme_images
        extreme_images(fp32, images)
    else:
        quantize_onnx(fp32, work / f"{model_name}.{step}.onnx", "int8_static", isa="avx512_vnni",
                      calibration=images, calibration_method=step)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mb": before,
                      "seconds": time.perf_counter() - start}), flush=True)


def measure(model_name: str, step: str, work: Path, cap_gb: float, size: int) -> dict:
    cap = int(cap_gb * 2 ** 30)
    child = subprocess.run([sys.executable, __file__, "--one", model_name, step, str(work), "--size", str(size)],
                           capture_output=True, text=True,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode or not lines:
        tail = (child.stderr.strip().splitlines() or ["?"])[-1][:200]
        over_cap = any(sign in child.stderr for sign in ("MemoryError", "bad_alloc", "Failed to allocate"))
        return {"model": model_name, "step": step, "failed": tail, "over_cap": over_cap}
    return {"model": model_name, "step": step, **json.loads(lines[-1])}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else ())
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def edgekd_commit() -> str:
    """The commit of the edgekd checkout a child process imports (PYTHONPATH may point at another one)."""
    where = "import edgekd, pathlib; print(pathlib.Path(edgekd.__file__).parents[1])"
    found = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, cwd=tempfile.gettempdir())
    checkout = found.stdout.strip()
    head = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() or checkout


def render(results: dict) -> str:
    runs = results["runs"]
    labels = list(runs)
    lines = [f"# Peak memory of the quantization steps at {results['size']} px", "",
             f"{results['machine']}; {results['date']}. Each step in a fresh process, 256 calibration images (32 for "
             f"the sensitivity ranking) of 3 x {results['size']} x {results['size']}; random weights and noise images "
             "(memory depends on the graph and the input size only). Peak resident set of the process; 'above "
             "start' subtracts what it held before the step (Python, torch, the images: about 0.9 GB). A step is "
             f"stopped at {results['cap_gb']:g} GB of address space.", "",
             "Reproduce: `python benchmarks/quantization_memory.py`" + (
                 "; the 'before' columns ran the same script against the previous code "
                 f"(`PYTHONPATH=<checkout of {results['before_commit']}> ... --label before`)"
                 if "before" in runs else ""), "",
             "| model | step | " + " | ".join(f"{label}: peak GB (above start) | {label}: s"
                                              for label in labels) + " |",
             "|---|---|" + "---:|---:|" * len(labels)]
    for model_name in results["models"]:
        for step in STEPS:
            cells = []
            for label in labels:
                row = next((r for r in runs[label] if r["model"] == model_name and r["step"] == step), None)
                if row is None:
                    cells += ["", ""]
                elif "failed" in row:
                    cells += ["over the cap" if row["over_cap"] else f"failed: {row['failed']}", ""]
                else:
                    cells += [f"{row['peak_mb'] / 1024:.2f} ({(row['peak_mb'] - row['before_mb']) / 1024:.2f})",
                              f"{row['seconds']:.0f}"]
            lines.append(f"| {model_name} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + results.get("notes", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "STEP", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=SIZE, help="input size in pixels")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantization_memory.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--label", default="now")
    parser.add_argument("--cap-gb", type=float, default=20.0)
    parser.add_argument("--no-save", action="store_true", help="print the rows; do not touch the results files")
    parser.add_argument("--table", action="store_true", help="re-render the markdown from the JSON")
    args = parser.parse_args()
    if args.one:
        run_step(args.one[0], args.one[1], Path(args.one[2]), args.size)
        return
    path = args.out
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if args.table:
        path.with_suffix(".md").write_text(render(results))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgekd-memory-") as work:
        for model_name in args.models.split(","):
            for step in args.steps.split(","):
                rows.append(measure(model_name, step, Path(work), args.cap_gb, args.size))
                print(json.dumps(rows[-1]), flush=True)
    if args.no_save:
        return
    # a run of some models or steps replaces those rows of its label and keeps the others
    measured = {(row["model"], row["step"]) for row in rows}
    kept = [row for row in results["runs"].get(args.label, []) if (row["model"], row["step"]) not in measured]
    results["runs"][args.label] = kept + rows
    if args.label == "before":
        results["before_commit"] = edgekd_commit()
    results["models"] = list(dict.fromkeys([*results.get("models", []), *args.models.split(",")]))
    results.update(cap_gb=args.cap_gb, size=args.size, date=str(date.today()),
                   machine=f"{cpu_name()}, {os.cpu_count()} cores, "
                           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB")
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(render(results))


if __name__ == "__main__":
    main()
