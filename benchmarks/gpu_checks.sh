#!/usr/bin/env bash
# What a machine with an NVIDIA GPU should run for issue #4 (none was lent to this project so far):
#   1. the CUDA tests (bf16 autocast + channels_last by default, a CUDA fine-tune and distillation);
#   2. the distillation throughput benchmark at 224 px, eager and torch.compile, with peak GPU memory;
#      it writes benchmarks/results/distill_throughput_cuda.{json,md,png}.
# Usage: benchmarks/gpu_checks.sh            (PYTHON=... to pick the interpreter; PYTHONPATH=. works without install)
# NCCL DDP needs one GPU per process: on a single-GPU machine torchrun with 2 processes cannot use NCCL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
"$PY" -m pytest -q tests/test_cuda.py -rs
"$PY" benchmarks/distill_throughput.py --device cuda --compile
