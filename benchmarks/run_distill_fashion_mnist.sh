#!/usr/bin/env bash
# Reproduces benchmarks/results/distill_fashion_mnist.{md,json}: the first table (this version's rows; the earlier
# tables' commands are in this file's git history). Each stage takes the shared CPU lock on its own, so other work
# on the machine can run in between (drop `flock` on a machine of your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOCK=${EDGEKD_LOCK:-/tmp/edgekd-cpu.lock}
flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py teacher
for seed in ${SEEDS:-0 1 2 3}; do
  for config in ${CONFIGS:-default labels-only kd-fixed-views}; do
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "$config" --seed "$seed"
  done
done
if [ -z "${CONFIGS:-}" ]; then  # the ingredient rows the table shows with fewer seeds (see its notes)
  for run in default-no-mix:0 default-no-mix:1 labels-only+mix:1 default-mix1:1 default-cutmix:1 \
             default-no-mix-t1:1 default-no-mix-t4:1 kd-fixed-views+mix:2 default-mix-alpha2:2 \
             default-mixup+cutmix:2; do  # default-ratio-per-image and default-mirrored-partner: see the notes
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "${run%:*}" --seed "${run#*:}"
  done
fi
"$PY" benchmarks/distill_fashion_mnist.py table
