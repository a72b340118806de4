#!/usr/bin/env bash
# Reproduces benchmarks/results/distill_fashion_mnist.{md,json}. Each stage takes the shared CPU lock on its own,
# so other work on the machine can run in between (drop `flock` on a machine of your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOCK=${EDGEKD_LOCK:-/tmp/edgekd-cpu.lock}
flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py teacher
for seed in ${SEEDS:-0 1 2}; do
  for config in ${CONFIGS:-default labels-only kd kd-fixed-views default-lr0.002 labels-only-lr0.002 kd-lr0.002 \
                  kd-fixed-views-lr0.002 default-ce1-lr0.002 labels-only-augmented-lr0.002 default-augmented-lr0.002 \
                  kd-default-weights-augmented-lr0.002}; do
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "$config" --seed "$seed"
  done
done
if [ -z "${CONFIGS:-}" ] && [ -z "${SEEDS:-}" ]; then  # the rows at edgekd's rate also have seeds 3 and 4
  for seed in 3 4; do
    for config in default labels-only kd kd-fixed-views; do
      flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "$config" --seed "$seed"
    done
  done
fi
if [ -z "${CONFIGS:-}" ]; then  # the ingredient rows the table shows with fewer seeds (see its notes)
  for run in default-augmented:0 labels-only-augmented:0 default-flip:0 labels-only-flip:0 kd-fixed-views-flip:0 \
             default-2x-epochs:0 labels-only-2x-epochs:0 kd-fixed-views-2x-epochs:0 \
             default-2x-epochs:1 labels-only-2x-epochs:1 kd-fixed-views-2x-epochs:1 \
             default-2x-epochs:2 labels-only-2x-epochs:2 kd-fixed-views-2x-epochs:2 \
             default-lr0.004:0 labels-only-lr0.004:0 kd-fixed-views-lr0.004:0 \
             default-lr0.016:0 labels-only-lr0.016:0 kd-fixed-views-lr0.016:0 \
             default-batch64-lr0.002:0 labels-only-batch64-lr0.002:0 kd-fixed-views-batch64-lr0.002:0 \
             default-2x-epochs-lr0.002:0 default-augmented-2x-epochs-lr0.002:0 kd+cutmix-lr0.002:0 \
             kd+mixup-lr0.002:0 kd+mixup-lr0.002:1 default+feature:1 default+feature:2 default+relation:1 \
             default+relation:2 kd+proj:0 kd+proj:1 kd+proj:2 default+proj:0 default+proj:1 default+proj:2 \
             kd+proj3:0 default+proj9:0 dist:0; do
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "${run%:*}" --seed "${run#*:}"
  done
fi
"$PY" benchmarks/distill_fashion_mnist.py table
