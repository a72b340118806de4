#!/usr/bin/env bash
# Reproduces benchmarks/results/distill_fashion_mnist.{md,json}. Each stage takes the shared CPU lock on its own,
# so other work on the machine can run in between (drop `flock` on a machine of your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOCK=${EDGEKD_LOCK:-/tmp/edgekd-cpu.lock}
flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py teacher
for seed in ${SEEDS:-0 1 2}; do
  for config in ${CONFIGS:-default labels-only kd kd-fixed-views default-ce1 labels-only-augmented default-augmented \
                  kd-default-weights-augmented}; do
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "$config" --seed "$seed"
  done
done
if [ -z "${CONFIGS:-}" ]; then  # the ingredient rows the table shows with fewer seeds (see its notes)
  for run in default-2x-epochs:0 default-augmented-2x-epochs:0 kd+cutmix:0 kd+mixup:0 kd+mixup:1; do
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "${run%:*}" --seed "${run#*:}"
  done
fi
"$PY" benchmarks/distill_fashion_mnist.py table
