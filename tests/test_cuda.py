"""The CUDA paths (bf16 autocast, channels_last, pinned memory) run only where a GPU is; CPU machines skip them."""

from __future__ import annotations

import pytest
import torch

from edgekd.data import load_data
from edgekd.distill import DistillConfig, distill
from edgekd.distill.teacher import prepare_teacher
from edgekd.distill.train_utils import Compute, pick_device
from edgekd.types import DataSpec, TeacherSpec, TrainConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_cuda_model_is_channels_last_and_runs_in_bf16():
    compute = Compute.choose(pick_device("cuda"))  # auto: bf16 autocast and channels_last on CUDA
    model = compute.prepare(torch.nn.Conv2d(3, 8, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    with compute.autocast():
        assert model(compute.inputs(torch.randn(2, 3, 16, 16))).dtype == torch.bfloat16


def test_teacher_fine_tune_and_distillation_on_cuda(tmp_path):
    data = load_data(DataSpec("fashion-mnist", max_train=256, max_val=128))
    train = TrainConfig(epochs=2, batch_size=32, num_workers=0, lr=3e-3, device="cuda")
    teacher = prepare_teacher(TeacherSpec("test_resnet", random_init=True), data, tmp_path / "t",
                              image_size=(32, 32), train_config=train)
    assert teacher.val_top1 is not None and teacher.val_top1 > 0.2
    checkpoint = distill([teacher], "test_efficientnet", data,
                         DistillConfig(epochs=1, batch_size=32, num_workers=0, device="cuda"), tmp_path / "s")
    assert checkpoint.val_top1 is not None and 0.0 <= checkpoint.teacher_agreement <= 1.0
    assert checkpoint.metrics["compute"] == "cuda, bfloat16 autocast, channels_last"
