"""Pieces every training loop here shares: device, mixed precision, optimizer + schedule, evaluation."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from edgekd.errors import EdgekdError

log = logging.getLogger(__name__)


def progress(iterable: Iterable, **kwargs) -> tqdm:
    """A progress bar with rate and ETA; redrawn rarely when stderr is a log file rather than a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, dynamic_ncols=True, mininterval=0.2 if interactive else 30.0, **kwargs)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgekdError(f"--device {requested} asked for CUDA but no GPU is visible; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "bf16", "fp32")
# /proc/cpuinfo flags of CPUs that compute in bf16 natively (x86 AVX512-BF16 / AMX, Arm BF16). Without them torch
# emulates bf16, slower than fp32; with them a ViT-B teacher's forward pass ran 3.3x faster on this project's
# 2-core host (benchmarks/results/distill_throughput_cpu.md).
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.lru_cache(maxsize=4)
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux: do not guess
        return False
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.partition(":")[2].split()}
    return bool(flags & NATIVE_BF16_FLAGS)


@dataclass(frozen=True)
class Compute:
    """Where and how a training or evaluation loop runs: the device, autocast's dtype and the memory layout.

    `auto` means bf16 autocast and channels_last on CUDA (bf16 needs no loss scaling; channels_last lets cuDNN use
    its fastest convolution kernels) and plain fp32 on CPU, except for a teacher's forward pass on a CPU with
    native bf16. Both can be forced on CPU, which is also how the CUDA code path is exercised without a GPU.
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: no autocast, everything in fp32
    channels_last: bool = False

    @classmethod
    def choose(cls, device: torch.device, precision: str = "auto", channels_last: bool | None = None, *,
               inference: bool = False) -> Compute:
        """`inference`: a frozen model's forward pass (the teacher's), where `auto` also takes bf16 on CPUs that
        compute it natively; training stays fp32 there (bf16 gave a MobileNet student's step no speed-up)."""
        if precision not in PRECISIONS:
            raise EdgekdError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        on_cuda = device.type == "cuda"
        native_bf16 = on_cuda or (inference and cpu_has_native_bf16())
        bf16 = precision == "bf16" or (precision == "auto" and native_bf16)
        if precision == "bf16" and not on_cuda and not cpu_has_native_bf16():
            _warn_once("bf16 was asked for, but this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16): torch "
                       "emulates it, usually slower than fp32")
        return cls(device, torch.bfloat16 if bf16 else None, on_cuda if channels_last is None else channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model to the device, in the chosen memory layout."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """Move an input batch to the device, in the model's memory layout."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def describe(self) -> str:
        precision = "fp32" if self.amp_dtype is None else f"{str(self.amp_dtype).removeprefix('torch.')} autocast"
        return f"{self.device}, {precision}" + (", channels_last" if self.channels_last else "")


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm scales (the usual timm recipe)."""
    decay, no_decay = [], []
    for param in params:
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero, stepped once per batch."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class EvalResult:
    top1: float | None  # None without labels
    top5: float | None
    count: int
    predictions: torch.Tensor  # top-1 class per sample, in loader order


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, compute: Compute, *, input_index: int = 0,
             description: str = "eval") -> EvalResult:
    """Top-1/top-5 accuracy of `model` on the `input_index`-th input of each batch."""
    model.eval()
    correct1 = correct5 = labeled = 0
    predictions = []
    for batch in progress(loader, desc=description, leave=False, unit="batch"):
        inputs, labels = compute.inputs(batch[input_index]), batch[-1].to(compute.device)
        with compute.autocast():
            logits = model(inputs).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        predictions.append(top[:, 0].cpu())
        mask = labels >= 0
        if mask.any():
            labeled += int(mask.sum())
            correct1 += int((top[mask, 0] == labels[mask]).sum())
            correct5 += int((top[mask] == labels[mask, None]).any(dim=1).sum())
    preds = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    if not labeled:
        return EvalResult(None, None, len(preds), preds)
    return EvalResult(correct1 / labeled, correct5 / labeled, len(preds), preds)
