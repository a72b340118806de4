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
  for config in ${CONFIGS:-default labels-only kd-fixed-views kd}; do
    flock "$LOCK" "$PY" benchmarks/distill_fashion_mnist.py student "$config" --seed "$seed"
  done
done
# The prototype rows (seeds 0-2) run with a patch from benchmarks/experiments applied (the table's notes name it):
#   git apply benchmarks/experiments/mixup_confusable_partner_prototype.patch
#   EDGEKD_EXP_MIX=confusable CONFIGS=default-confusable SEEDS="0 1 2" benchmarks/run_distill_fashion_mnist.sh
# and likewise crop_views_added_prototype.patch with EDGEKD_EXP_MIX=crop-added for default-crop-added.
"$PY" benchmarks/distill_fashion_mnist.py table
