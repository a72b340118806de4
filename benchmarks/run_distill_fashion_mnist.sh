#!/usr/bin/env bash
# Reproduces benchmarks/results/distill_fashion_mnist.{md,json}. Each stage takes the shared CPU lock on its own,
# so other work on the machine can run in between (drop `flock` on a machine of your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOCK=${EDGEKD_LOCK:-/tmp/edgekd-cpu.lock}
flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py teacher
for seed in ${SEEDS:-0 1 2}; do
  for config in ${CONFIGS:-labels-only kd dkd wsl kd+feature kd+feature+relation}; do
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "$config" --seed "$seed"
  done
done
"$PY" benchmarks/distill_fashion_mnist.py table
