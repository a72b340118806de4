"""Pieces every training loop here shares: device, mixed precision, optimizer + schedule, evaluation."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from edgekd.errors import EdgekdError
from edgekd.data import UNREADABLE
from edgekd.metrics import accuracy, top_predictions

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
# emulates bf16, slower than fp32; with them a ViT-B teacher's forward pass ran 3.6x faster on this project's
# 2-core Xeon with AMX (benchmarks/results/distill_throughput_cpu.md; 3.3x on an AMD EPYC with AVX512-BF16).
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


# From random weights, one rate for every layer (AdamW, batch 128): the rate of teachers trained from random
# weights (`edgekd train-teacher --random-init`), not measured. A student distilled from random weights takes
# edgekd.recipe's FROM_RANDOM.lr instead (8e-3, measured: benchmarks/results/distill_fashion_mnist.md).
SCRATCH_LR = 2e-3
# Fine-tuning real weights (a pretrained teacher or student with a new, zeroed head): AdamW with the head at the
# full rate and the backbone at rates falling geometrically with depth (timm's layer-wise decay). For CNNs, measured
# on a real ImageNet EfficientNet-Lite2 fitted to Fashion-MNIST at 64 px (6,000 images, 2 epochs;
# benchmarks/results/real_weights_fashion_mnist.md): head 4e-3 with the stem at 1/4 of it reached 87.05% top-1, a
# flat 2e-3 85.80%, a flat 4e-3 85.45%, 1e-3 with the stem at 1/20 81.80%. Transformers (timm's fixed-input-size models) take the
# published ViT fine-tuning recipe of BEiT/MAE instead: 5e-4 x batch/256 and a decay of 0.75 per layer (not
# measured here: no pretrained ViT installs offline).
CNN_TRANSFER_LR = 4e-3
STEM_LR_FRACTION = 0.25
TRANSFORMER_TRANSFER_LR_PER_256 = 5e-4
TRANSFORMER_LAYER_DECAY = 0.75


@dataclass(frozen=True)
class Recipe:
    """The optimiser's rates: the head's peak rate and the per-layer decay below it (None: every layer the same)."""

    lr: float
    layer_decay: float | None

    def describe(self) -> str:
        decay = f"backbone rates decaying {self.layer_decay:.3f}x per layer" if self.layer_decay else \
            "every layer at that rate"
        return f"AdamW, head lr {self.lr:.2g}, {decay}"


def recipe_for(model: torch.nn.Module, *, transfer: bool, batch_size: int, lr: float | None = None,
               layer_decay: float | None = None) -> Recipe:
    """edgekd's rates for `model`: the transfer recipe when it starts from real weights, else one rate for all;
    `lr` / `layer_decay` (when given) override the default's parts."""
    if not transfer:
        return Recipe(lr if lr is not None else SCRATCH_LR, layer_decay)
    transformer = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    if transformer:
        default = Recipe(TRANSFORMER_TRANSFER_LR_PER_256 * batch_size / 256, TRANSFORMER_LAYER_DECAY)
    else:
        default = Recipe(CNN_TRANSFER_LR, STEM_LR_FRACTION ** (1.0 / max(1, _layer_count(model) - 1)))
    return Recipe(lr if lr is not None else default.lr,
                  layer_decay if layer_decay is not None else default.layer_decay)


def _layer_count(model: torch.nn.Module) -> int:
    """The layer groups timm's layer-wise decay sees in `model` (its group_matcher, else automatic grouping)."""
    from timm.models import group_parameters

    if hasattr(model, "group_matcher"):
        return max(group_parameters(model, model.group_matcher(coarse=False), reverse=True).values()) + 1
    from timm.optim._param_groups import auto_group_layers

    return max(auto_group_layers(model).values()) + 1


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, *, layer_decay: float | None = None,
                   extra: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """timm's AdamW (timm.optim.create_optimizer_v2): no weight decay on biases and norm scales and, with
    `layer_decay`, timm's layer-wise rates (each group's lr_scale = decay^(depth from the head), applied by timm's
    scheduler, warmup_cosine). `extra` (feature adapters) trains at `lr`, with the same weight-decay rule."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    decay = layer_decay if layer_decay is not None and layer_decay < 1.0 else None
    if extra is None:
        return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=decay)
    if decay is None:
        groups = param_groups_weight_decay(model, weight_decay)
    else:
        from timm.optim import param_groups_layer_decay

        no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_layer_decay(model, weight_decay, no_decay, layer_decay=decay)
    return create_optimizer_v2([*groups, *param_groups_weight_decay(extra, weight_decay)], opt="adamw", lr=lr,
                               weight_decay=weight_decay)


# Activation memory that training may use, unless EDGEKD_TRAIN_MEMORY_GB says otherwise: a 16 GB laptop without a
# GPU must not run out of memory on the defaults (an EfficientNet-Lite2 at 260 px, batch 128, peaked at 20 GB).
CPU_TRAIN_MEMORY_GB = 4.0
CUDA_MEMORY_FRACTION = 0.6
BACKWARD_OVERHEAD = 2.5  # peak / saved activations, measured on CNNs and ViTs: gradients and temporaries on top


def saved_activation_bytes(model: torch.nn.Module, input_shape: tuple[int, ...], compute: Compute) -> float:
    """Bytes autograd keeps per image for the backward pass of `model`: training forwards on 2 and 4 images, half the
    difference (weights saved for backward count once, not per image; BatchNorm needs 2+ values per channel, which a
    1x1 map of one image lacks). BatchNorm statistics are restored after."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        totals = [_saved_bytes(model, compute.inputs(torch.zeros(n, *input_shape)), compute) for n in (2, 4)]
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    return float(max(totals[1] - totals[0], 0)) / 2


def _saved_bytes(model: torch.nn.Module, sample: torch.Tensor, compute: Compute) -> int:
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), compute.autocast():
        output = model(sample)
    del output
    return total


def train_memory_budget(device: torch.device) -> float:
    """Bytes of activations a training step may hold (see CPU_TRAIN_MEMORY_GB)."""
    override = os.environ.get("EDGEKD_TRAIN_MEMORY_GB")
    if override:
        return float(override) * 2**30
    if device.type == "cuda":
        return CUDA_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
    return CPU_TRAIN_MEMORY_GB * 2**30


def micro_batch_size(model: torch.nn.Module, input_shape: tuple[int, ...], batch_size: int, compute: Compute) -> int:
    """The largest slice of a `batch_size` batch whose training step fits the memory budget; the step accumulates
    gradients over the slices, so the optimisation sees the same batch (BatchNorm statistics excepted)."""
    per_image = saved_activation_bytes(model, input_shape, compute) * BACKWARD_OVERHEAD
    fits = int(train_memory_budget(compute.device) // max(per_image, 1.0))
    micro = max(MIN_SLICE, min(batch_size, fits))
    if micro < batch_size:
        log.info("training in slices of %d images (gradients accumulated over the batch of %d): about %.0f MB of "
                 "activations per image against a %.1f GB budget (EDGEKD_TRAIN_MEMORY_GB)", micro, batch_size,
                 per_image / 1e6, train_memory_budget(compute.device) / 2**30)
    return micro


MIN_SLICE = 2  # BatchNorm needs 2+ values per channel, relation losses 2+ images


def slices(batch_size: int, micro: int) -> list[slice]:
    """Consecutive slices of near-equal size (at most `micro`, at least MIN_SLICE when the batch allows) covering a
    batch: 128 in slices of 127 is 64 + 64, not 127 + 1 (one image breaks BatchNorm and relation losses)."""
    count = max(1, min(math.ceil(batch_size / max(micro, 1)), batch_size // MIN_SLICE))
    edges = [round(i * batch_size / count) for i in range(count + 1)]
    return [slice(start, end) for start, end in zip(edges, edges[1:])]


def backward_in_slices(size: int, micro: int | None, slice_loss: Callable[[slice], tuple[torch.Tensor, dict]],
                       model: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backpropagate one batch's loss slice by slice (see micro_batch_size): each slice's loss is weighted by its
    share of the batch, so the accumulated gradient is the whole batch's mean. Under DDP (`model.no_sync`) gradients
    are all-reduced once, after the last slice. Returns the batch's weighted loss and loss terms, detached."""
    parts = slices(size, micro or size)
    total: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = {}
    for index, part in enumerate(parts):
        loss, part_terms = slice_loss(part)
        share = (part.stop - part.start) / size
        synced = index == len(parts) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if synced else model.no_sync():
            (loss * share).backward()
        total = loss.detach() * share if total is None else total + loss.detach() * share
        for name, value in part_terms.items():
            terms[name] = terms.get(name, 0.0) + value * share
    assert total is not None, "a batch has at least one slice"
    return total, terms


def check_finite(loss: float, step: int, what: str) -> None:
    """Stop a diverged run before it saves NaN weights as a result (the last epoch's checkpoint stays)."""
    if not math.isfinite(loss):
        raise EdgekdError(f"{what} diverged: the loss is {loss} at step {step}; lower --lr, or check the images and "
                          "the teacher")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """timm's CosineLRScheduler, per optimizer step: linear warm-up over `warmup_fraction` of the steps, then cosine
    decay to zero. Call `step_update(steps_done)` after each optimizer step; it applies each group's lr_scale."""
    from timm.scheduler import CosineLRScheduler

    warmup = max(1, int(total_steps * warmup_fraction))
    base = optimizer.param_groups[0]["lr"]
    # Step s < warmup runs at (s + 1) / warmup of the peak: the first step already learns, the last warm-up step
    # reaches the peak, where the cosine starts.
    # A run of a step or two leaves no room for the cosine; timm says so on the log, which a user cannot act on.
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup + 1), lr_min=0.0,
                                 warmup_t=warmup - 1, warmup_lr_init=base / warmup, warmup_prefix=True,
                                 t_in_epochs=False)
    finally:
        timm_log.setLevel(level)


@dataclass(frozen=True)
class EvalResult:
    top1: float | None  # None without labels
    top5: float | None
    count: int
    predictions: torch.Tensor  # top-1 class per image scored, in loader order
    indices: np.ndarray  # the loader positions of those images (undecodable ones are left out)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, compute: Compute, *, input_index: int = 0,
             description: str = "eval") -> EvalResult:
    """Top-1/top-5 accuracy of `model` on the `input_index`-th input of each batch."""
    model.eval()
    tops, labels = [], []
    for batch in progress(loader, desc=description, leave=False, unit="batch"):
        with compute.autocast():
            logits = model(compute.inputs(batch[input_index])).float()
        tops.append(top_predictions(logits.cpu().numpy()))  # N x 5 ints: small whatever the data's size
        labels.append(batch[-1].numpy())
    if not tops:
        return EvalResult(None, None, 0, torch.empty(0, dtype=torch.long), np.empty(0, dtype=np.int64))
    readable = np.concatenate(labels) != UNREADABLE  # images that could not be decoded count nowhere
    if not readable.any():
        raise EdgekdError(f"none of the {len(readable)} validation images can be decoded; check --data")
    top, truth = np.concatenate(tops)[readable], np.concatenate(labels)[readable]
    top1, top5 = accuracy(top, truth)
    return EvalResult(top1, top5, len(top), torch.from_numpy(top[:, 0]), np.flatnonzero(readable))
