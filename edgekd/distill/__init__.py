"""Knowledge distillation: response, feature and relation losses, one or several teachers, one or many GPUs."""

from edgekd.distill.losses import LOSSES, LossSpec, default_loss_specs, parse_loss_specs
from edgekd.distill.train import DistillConfig, distill

__all__ = ["LOSSES", "DistillConfig", "LossSpec", "default_loss_specs", "distill", "parse_loss_specs"]
