"""The default distillation recipe, in one place: `compress`, `distill`, their --help and the benchmark read it here.

Chosen by benchmarks/results/distill_fashion_mnist.md (run benchmarks/run_distill_fashion_mnist.sh), not by taste;
change it only with a benchmark that beats it on every seed. Torch-free, so the CLI's --help stays fast.
"""

from __future__ import annotations

MIX_MODES = ("none", "mixup", "cutmix", "mixup+cutmix")

DEFAULT_LOSSES = (("ce", 1.0), ("kd", 1.0))  # ce only where there are labels
DEFAULT_TEMPERATURE = 4.0
DEFAULT_MIX = "none"
DEFAULT_MIX_ALPHA = 1.0
