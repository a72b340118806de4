"""The default distillation recipe, in one place: `compress`, `distill`, their --help and the benchmarks read it here.

Chosen by benchmarks/results/distill_fashion_mnist.md (benchmarks/run_distill_fashion_mnist.sh), not by taste:
logit-standardized KD (Sun et al., CVPR 2024, with the paper's T=2, kd weight 9, ce weight 0.1) against plain
Hinton KD (ce=1, kd=1, T=4), labels only, DKD, WSL, feature and relation terms, and consistent mixup/cutmix.
Change it only with a benchmark that beats it on every seed. Torch-free, so the CLI's --help stays fast.
"""

from __future__ import annotations

MIX_MODES = ("none", "mixup", "cutmix", "mixup+cutmix")

DEFAULT_LOSSES = ("ce=0.1", "kd=9")  # --loss terms; ce is left out where the data has no labels
DEFAULT_LOSS_OPTIONS = ("kd.standardize=1",)  # --loss-option settings of those terms
DEFAULT_TEMPERATURE = 2.0
DEFAULT_MIX = "none"  # consistent mixup/cutmix cost 4-5 points at the benchmark's 8 epochs (see the table)
DEFAULT_MIX_ALPHA = 1.0
