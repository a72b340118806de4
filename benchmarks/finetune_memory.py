"""Peak memory of fine-tuning a real EfficientNet-Lite2 at its native 260 px on CPU, with edgekd's defaults.

    python benchmarks/finetune_memory.py        # ~3 min on the 2-core host

Batch 128 computed in memory-sized slices (train_utils.micro_batch_size: 4 GB of activations on CPU) against the
same run with slicing off (EDGEKD_TRAIN_MEMORY_GB=1000) at batch 32 — batch 128 unsliced peaked at 20 GB in
issue 10, more than this 24 GB machine can safely show. Each run is its own process; peak RSS from getrusage.
Results: benchmarks/results/finetune_memory.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("edgekd default: batch 128 in memory-sized slices", "128", None),
        ("slicing off, batch 32", "32", "1000"))


def main() -> None:
    out = ROOT / "benchmarks" / "results" / "finetune_memory"
    work = Path(tempfile.mkdtemp(prefix="edgekd-memory-"))
    hub = work / "hub"
    subprocess.run([sys.executable, "-m", "edgekd.lite_weights", "--hub-cache", str(hub), "tf_efficientnet_lite2"],
                   check=True, cwd=ROOT)
    rows = []
    for label, batch, budget in RUNS:
        env = {**os.environ, "HF_HUB_CACHE": str(hub), "PYTHONPATH": str(ROOT)}
        if budget:
            env["EDGEKD_TRAIN_MEMORY_GB"] = budget
        command = [sys.executable, "-c", "import resource, sys; from edgekd.cli import app; sys.argv = sys.argv[1:];"
                   "\ntry:\n    app()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
                   "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
                   "edgekd", "train-teacher", "--teacher", "tf_efficientnet_lite2", "--data", "fashion-mnist",
                   "--input-size", "260", "--max-train", "256", "--max-val", "64", "--epochs", "1",
                   "--batch-size", batch, "--workers", "0", "--out", str(work / batch)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        peak_kb = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
        sliced = next((line for line in done.stderr.splitlines() if "training in slices" in line), "")
        rows.append({"run": label, "batch": int(batch), "peak_rss_gb": round(peak_kb / 2**20, 2),
                     "seconds": round(time.perf_counter() - started, 1), "slices": sliced.removeprefix("edgekd: ")})
        print(rows[-1], flush=True)
    result = {"command": "python benchmarks/finetune_memory.py", "model": "tf_efficientnet_lite2 (real ImageNet "
              "weights), 260 px, 256 Fashion-MNIST images, 1 epoch, CPU fp32", "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"<!-- Made by `{result['command']}` on the 2-core dev host. -->", "",
             f"# Fine-tuning memory: {result['model']}", "", "| run | batch | peak RSS GB | seconds | slicing |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['batch']} | {r['peak_rss_gb']:.2f} | {r['seconds']:.0f} | {r['slices'] or '-'} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
