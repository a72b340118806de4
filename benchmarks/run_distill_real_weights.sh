#!/usr/bin/env bash
# Reproduces benchmarks/results/distill_real_weights.{md,json}: fixed views or a shared random crop/flip for the
# teacher-derived Lite2 student of `make demo`. Each stage takes the shared CPU lock on its own (drop `flock` on a
# machine of your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOCK=${EDGEKD_LOCK:-/tmp/edgekd-cpu.lock}
flock "$LOCK" "$PY" benchmarks/distill_real_weights.py teacher
for seed in ${SEEDS:-0 1 2}; do
  for config in derived-fixed-views derived-crop-flip; do
    flock "$LOCK" "$PY" benchmarks/distill_real_weights.py student "$config" --seed "$seed"
  done
done
"$PY" benchmarks/distill_real_weights.py table
