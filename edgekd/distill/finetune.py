"""Supervised fine-tuning of a classifier on labeled data (used to fit a teacher's head to the data's classes).

Resumable: the training state is written whole after every epoch, and a re-run continues from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgekd.artifacts import write_json_atomic
from edgekd.data import LoadedData, ModelInputs, make_loader
from edgekd.distill.sampling import EpochSampler, SeededItems
from edgekd.distill.train_utils import (Compute, backward_in_slices, check_finite, evaluate, make_optimizer,
                                        micro_batch_size, pick_device, progress, recipe_for, seed_everything,
                                        warmup_cosine)
from edgekd.interrupts import interrupts_held
from edgekd.record import (TrainState, data_fingerprint, resume_training_state, save_training_state, stage_key,
                           state_kept_on_interrupt)
from edgekd.types import Preprocess, TrainConfig

log = logging.getLogger(__name__)


def train_classifier(model: torch.nn.Module, data: LoadedData, preprocess: Preprocess, config: TrainConfig,
                     work_dir: Path, label: str = "train", *, transfer: bool = False, identity: str = "",
                     ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train `model` with cross-entropy; returns it (on CPU, eval mode) and one metrics dict per epoch.

    `transfer`: the backbone holds real (pretrained) weights: the new head trains at the full rate, the backbone at
    layer-wise decayed rates (train_utils.recipe_for). `identity`: what the caller keys the model and its starting
    weights on, so a resumed state is never one of another model's.
    """
    seed_everything(config.seed)
    compute = Compute.choose(pick_device(config.device), config.precision, config.channels_last)
    device = compute.device
    log.info("%s on %s", label, compute.describe())
    model = compute.prepare(model)
    # Data order and augmentation are functions of (seed, epoch, index) (sampling.py), so an interrupted epoch
    # resumes at the batch it stopped at, with the batches an uninterrupted run would have drawn.
    drop_last = len(data.train) > config.batch_size
    sampler = EpochSampler(len(data.train), num_replicas=1, rank=0, seed=config.seed, drop_last=False)
    train_loader = make_loader(SeededItems(ModelInputs(data.train, [preprocess], training=True), config.seed),
                               config.batch_size, shuffle=False, seed=config.seed, sampler=sampler,
                               num_workers=config.num_workers, device=device, drop_last=drop_last)
    val_loader = make_loader(ModelInputs(data.val, [preprocess], training=False), config.batch_size * 2,
                             shuffle=False, num_workers=config.num_workers, device=device)
    steps_per_epoch = len(train_loader)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    recipe = recipe_for(model, transfer=transfer, batch_size=config.batch_size, lr=config.lr,
                        layer_decay=config.layer_decay)
    log.info("%s recipe: %s, %d%% warm-up then cosine", label, recipe.describe(), round(100 * config.warmup_fraction))
    optimizer = make_optimizer(model, recipe.lr, config.weight_decay, layer_decay=recipe.layer_decay)
    scheduler = warmup_cosine(optimizer, total_steps, config.warmup_fraction)
    micro = micro_batch_size(model, preprocess.input_size, config.batch_size, compute)

    state_path = Path(work_dir) / "train_state.pt"
    key = stage_key("fine-tune", {"config": config.outcome_fields(), "preprocess": preprocess.to_dict(),
                                  "data": data_fingerprint(data, unlabeled=False), "transfer": transfer,
                                  "identity": identity})
    state = resume_training_state(state_path, key, model, optimizer, scheduler)
    step, history = state.step, state.history
    epochs = math.ceil(total_steps / steps_per_epoch)
    # The epoch to go on with is the first without a history entry (an interruption after its last batch still
    # evaluates it); the batches of it already trained follow from the step.
    for epoch in range(len(history), epochs):
        model.train()
        done = step - epoch * steps_per_epoch  # batches of this epoch trained before an interruption
        sampler.set_position(epoch, done * config.batch_size)
        partial = state.partial or {}
        seen, running = int(partial.get("seen", 0)), partial.get("running", 0.0)
        started = time.perf_counter() - partial.get("seconds", 0.0)
        epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        bar = progress(train_loader, total=epoch_steps, initial=done, desc=f"{label} epoch {epoch + 1}/{epochs}",
                       unit="batch")
        batches = zip(range(done, epoch_steps), bar)

        def save() -> int:  # the batches done (all of the epoch's, when it came in validation) and their sums
            save_training_state(state_path, key, TrainState(step, history, state.partial), model, optimizer, scheduler)
            return step

        with state_kept_on_interrupt(save, state_path), contextlib.closing(bar):
            for batch_index, (inputs, labels, _) in batches:
                inputs, labels = compute.inputs(inputs), labels.to(device)

                def slice_loss(part: slice) -> tuple[torch.Tensor, dict]:
                    with compute.autocast():
                        return F.cross_entropy(model(inputs[part]).float(), labels[part], label_smoothing=0.1), {}

                with interrupts_held():  # a step lands whole (weights, BatchNorm statistics, step count) or not
                    optimizer.zero_grad(set_to_none=True)
                    loss, _ = backward_in_slices(len(labels), micro, slice_loss)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                    step += 1
                    scheduler.step_update(step)
                    seen += len(labels)
                    running += loss.item()
                    state.partial = {"seen": seen, "running": running, "seconds": time.perf_counter() - started}
                check_finite(running, step, label)
                bar.set_postfix(refresh=False, loss=f"{running / (batch_index + 1):.3f}",
                                img_s=f"{seen / (time.perf_counter() - started):.0f}")
            bar.close()  # before validation's own bar
            result = evaluate(model, val_loader, compute, description=f"{label} val")
        state.partial = None
        metrics = {"epoch": epoch + 1, "train_loss": running / max(1, epoch_steps), "val_top1": result.top1,
                   "val_top5": result.top5, "seconds": time.perf_counter() - started,
                   "images_per_s": seen / (time.perf_counter() - started)}
        history.append(metrics)
        log.info("%s epoch %d: loss %.4f, val top-1 %.2f%%", label, epoch + 1, metrics["train_loss"],
                 100 * (result.top1 or 0))
        save_training_state(state_path, key, TrainState(step, history), model, optimizer, scheduler)
    write_json_atomic(Path(work_dir) / "train_log.json", history)
    return model.cpu().eval(), history
