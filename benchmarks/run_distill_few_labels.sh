#!/usr/bin/env bash
# Reproduces benchmarks/results/distill_few_labels.{md,json}: 1,000 labeled Fashion-MNIST images plus the other
# 59,000 as an unlabeled PNG folder. Each stage takes the shared CPU lock on its own (drop `flock` on a machine of
# your own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOCK=${EDGEKD_LOCK:-/tmp/edgekd-cpu.lock}
flock "$LOCK" "$PY" benchmarks/distill_few_labels.py unlabeled-folder
flock "$LOCK" "$PY" benchmarks/distill_few_labels.py teacher
for seed in ${SEEDS:-0 1 2}; do
  for config in ${CONFIGS:-labels-only default default-no-mix labels-only-lr0.002 labels-only-fixed-views-lr0.002 \
                  default-lr0.002 default-ce1-lr0.002 default-augmented-lr0.002}; do
    flock "$LOCK" "$PY" benchmarks/distill_few_labels.py student "$config" --seed "$seed"
  done
done
if [ -z "${CONFIGS:-}" ]; then  # the ingredient rows the table shows with one seed
  for config in kd kd+proj default-labeled-only-lr0.002 default-labeled-only-fixed-views-lr0.002 kd-lr0.002 \
                default-augmented-2x-epochs-lr0.002; do
    flock "$LOCK" "$PY" benchmarks/distill_few_labels.py student "$config" --seed 0
  done
fi
"$PY" benchmarks/distill_few_labels.py table
