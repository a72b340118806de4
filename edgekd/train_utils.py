"""Pieces every training loop here shares: device, mixed precision, optimizer + schedule, evaluation."""

from __future__ import annotations

import contextlib
import math
import random
import sys
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from edgekd.errors import EdgekdError


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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full fp32 on CPU, where bf16 is slower on most CPUs."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; channels_last on CUDA, where convolutions run faster in that layout."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    if device.type == "cuda" and batch.ndim == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


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
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, *, input_index: int = 0,
             description: str = "eval") -> EvalResult:
    """Top-1/top-5 accuracy of `model` on the `input_index`-th input of each batch."""
    model.eval()
    correct1 = correct5 = labeled = 0
    predictions = []
    for batch in progress(loader, desc=description, leave=False, unit="batch"):
        inputs, labels = to_device(batch[input_index], device), batch[-1].to(device)
        with autocast(device):
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
