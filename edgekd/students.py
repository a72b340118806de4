"""Student architectures: timm models by name (and, later, students derived from the teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from edgekd.errors import EdgekdError
from edgekd.models import create_model, resolve_model_name
from edgekd.types import StudentCheckpoint


def build_student(name: str, num_classes: int, image_size: tuple[int, int] | None) -> torch.nn.Module:
    """A fresh student module for `name` (randomly initialised)."""
    return create_model(resolve_model_name(name), num_classes, image_size)


def read_student_checkpoint(folder_or_json: Path) -> StudentCheckpoint:
    path = Path(folder_or_json)
    path = path / "student.json" if path.is_dir() else path
    if not path.is_file():
        raise EdgekdError(f"no student checkpoint at {path}; give a folder holding student.json + student.safetensors")
    checkpoint = StudentCheckpoint.from_dict(json.loads(path.read_text()))
    if not checkpoint.weights_path.is_absolute():
        checkpoint = StudentCheckpoint.from_dict({**checkpoint.to_dict(),
                                                  "weights_path": str(path.parent / checkpoint.weights_path)})
    return checkpoint


def load_student(checkpoint: StudentCheckpoint) -> torch.nn.Module:
    """The trained student as an eval-mode module."""
    model = build_student(checkpoint.model_name, checkpoint.num_classes, checkpoint.preprocess.image_size)
    model.load_state_dict(load_file(str(checkpoint.weights_path)))
    return model.eval()
