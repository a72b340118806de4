"""Tiny real students for export/quantization tests: timm test models briefly trained on real Fashion-MNIST.

Trained once per test session (a few seconds each) and saved as a StudentCheckpoint folder, exactly what
`edgekd export` reads.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgekd.artifacts import write_json_atomic
from edgekd.data import LoadedData, ModelInputs
from edgekd.models import preprocess_for
from edgekd.distill.students import build_student
from edgekd.types import StudentCheckpoint

IMAGE_SIZE = 32


@lru_cache(maxsize=None)
def tiny_student(name: str, data: LoadedData, epochs: int = 6) -> Path:
    """Train timm `name` at 32 px on `data` and return its checkpoint folder (student.json + .safetensors)."""
    torch.manual_seed(0)
    model = build_student(name, data.info.num_classes, (IMAGE_SIZE, IMAGE_SIZE))
    pre = preprocess_for(model, (IMAGE_SIZE, IMAGE_SIZE))
    loader = torch.utils.data.DataLoader(ModelInputs(data.train, [pre], training=False), batch_size=50,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    folder = Path(tempfile.mkdtemp(prefix=f"edgekd-student-{name}-"))
    atexit.register(shutil.rmtree, folder, True)  # cached for the session, removed when it ends
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "student.safetensors"))
    checkpoint = StudentCheckpoint(model_name=name, weights_path=Path("student.safetensors"),
                                   num_classes=data.info.num_classes, class_names=data.info.class_names,
                                   preprocess=pre)
    write_json_atomic(folder / "student.json", checkpoint.to_dict())
    return folder
