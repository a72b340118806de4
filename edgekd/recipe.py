"""The default distillation recipe, in one place: `compress`, `distill`, their --help and the benchmarks read it here.

It depends on where the student starts, because the two measurements disagree:
- From random weights: logit-standardized KD (Sun et al., CVPR 2024, with the paper's T=2, kd weight 9, ce weight
  0.1). In benchmarks/results/distill_fashion_mnist.md (3 seeds) it beat plain Hinton KD (ce=1, kd=1, T=4) by 1.21
  points and labels only by 2.30, better on every seed; consistent mixup/cutmix lost 4-5 points there.
- From real weights (pretrained, teacher-derived, a checkpoint): plain KD. In `make demo` (a real EfficientNet-Lite2
  teacher, a teacher-derived student that ends above its teacher) the standardized recipe's heavy kd weight held
  the student near the teacher: 86.95% top-1 (benchmarks/results/demo_compress_host_standardized_kd.md), against
  88.35-88.80% with plain KD (benchmarks/results/demo_compress_host.md); one run each.
Change either only with a benchmark that beats it. Torch-free, so the CLI's --help stays fast.
"""

from __future__ import annotations

MIX_MODES = ("none", "mixup", "cutmix", "mixup+cutmix")

DEFAULT_LOSSES = ("ce=0.1", "kd=9")  # --loss terms; ce is left out where the data has no labels
DEFAULT_LOSS_OPTIONS = ("kd.standardize=1",)  # --loss-option settings of those terms
DEFAULT_TEMPERATURE = 2.0
TRANSFER_LOSSES = ("ce=1", "kd=1")  # students from real weights
TRANSFER_LOSS_OPTIONS: tuple[str, ...] = ()
TRANSFER_TEMPERATURE = 4.0
DEFAULT_MIX = "none"  # consistent mixup/cutmix cost 4-5 points at the benchmark's 8 epochs (see the table)
DEFAULT_MIX_ALPHA = 1.0


def default_recipe(transfer: bool) -> tuple[tuple[str, ...], tuple[str, ...], float]:
    """(--loss terms, --loss-option settings, temperature) for a student from real weights (transfer) or random."""
    if transfer:
        return TRANSFER_LOSSES, TRANSFER_LOSS_OPTIONS, TRANSFER_TEMPERATURE
    return DEFAULT_LOSSES, DEFAULT_LOSS_OPTIONS, DEFAULT_TEMPERATURE
