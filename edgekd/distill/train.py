"""The distillation loop: one or several frozen teachers, one student, a weighted sum of KD losses.

Runs alone or as one rank of `torchrun` (DDP, DistributedSampler; rank 0 writes). bf16 autocast and
channels_last on CUDA (forcible on CPU; see train_utils.Compute), optional torch.compile. Resumable: a
checkpoint after every epoch and on interruption, and data order + augmentation that depend only on
(seed, epoch, index), so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from edgekd.artifacts import atomic_path, config_hash, sha256_file, write_json_atomic
from edgekd.data import LoadedData, ModelInputs, make_loader, training_records
from edgekd.distill.features import (DEFAULT_PAIRS, HintedStudent, TappedModel, embedding_width, feature_shapes,
                                    list_taps, pair_layers)
from edgekd.distill.losses import LossInputs, LossSpec, Objective, TeacherView, default_loss_specs
from edgekd.distill.mixing import check_mix, mix_batch
from edgekd.distill.sampling import EpochSampler, SeededItems
from edgekd.distill.views import MirrorDraw, mirror, view_rows
from edgekd.distill.state import (STATE_NAME, Processes, TeacherCache, agree_on_minimum, finish_processes,
                                  share_from_main, start_processes, sync_buffers, teacher_cache_root)
from edgekd.errors import EdgekdError
from edgekd.interrupts import interrupts_held
from edgekd.metrics import paired_agreement
from edgekd.models import preprocess_for
from edgekd.recipe import (DEFAULT_MIX_ALPHA, MIRROR_FIXED_VIEWS, default_augment, default_for_start,
                           recipe_fingerprint)
from edgekd.record import (TrainState, data_fingerprint, key_inputs, records_fingerprint, resume_training_state,
                           save_training_state, stage_key, state_kept_on_interrupt)
from edgekd.distill.students import StudentStart, build_student
from edgekd.distill.teacher import load_teacher_model
from edgekd.distill.train_utils import (PRECISIONS, Compute, backward_in_slices, check_finite, evaluate,
                                        make_optimizer, micro_batch_size, progress, recipe_for, seed_everything,
                                        warmup_cosine)
from edgekd.types import Preprocess, StudentCheckpoint, TeacherResult

log = logging.getLogger(__name__)

WEIGHTINGS = ("confidence", "mean")


@dataclass(frozen=True)
class DistillConfig:
    """How to distil. `losses` empty means the default combination (see losses.default_loss_specs)."""

    losses: tuple[LossSpec, ...] = ()
    temperature: float | None = None  # None: the recipe's for the student's start (edgekd.recipe)
    feature_pairs: tuple[tuple[str, str], ...] | None = None  # (student layer, teacher layer); None: automatic
    num_feature_pairs: int = DEFAULT_PAIRS
    teacher_weighting: str = "confidence"  # several teachers: per-sample by confidence, or a plain mean
    epochs: float = 10.0
    batch_size: int = 128  # global: split across torchrun processes; computed in memory-sized slices
    lr: float | None = None  # the head's peak rate; None: train_utils.recipe_for's default for the start
    layer_decay: float | None = None  # None: likewise (timm's layer-wise decay from real starting weights)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    image_size: tuple[int, int] | None = None  # the student's input; None: the first teacher's
    augment: bool | None = None  # shared random crop + flip for teacher and student; None: edgekd.recipe's
    # fixed views only: each image or its mirror image, drawn per image and epoch, the same for every model; the
    # teacher cache then holds both (views.py). None: edgekd.recipe's
    flip: bool | None = None
    # mixup / cutmix of the shared view, for teacher and student alike (mixing.py); None: edgekd.recipe's
    mix: str | None = None
    mix_alpha: float = DEFAULT_MIX_ALPHA  # the mixing ratio's Beta(alpha, alpha); 1.0: uniform, as in function matching
    # mixed images added to each batch per image in it (0.5: 64 beside a batch of 128), the batch's own images kept;
    # 0: every image is mixed instead. None: edgekd.recipe's
    mix_extra: float | None = None
    # reuse teacher outputs across epochs (only on fixed views, and without feature losses; with mixed images added
    # the teacher answers those live); None: wherever that holds, as it does on the default's fixed views
    cache_teacher: bool | None = None
    labeled_repeat: int = 1  # with --unlabeled-data: each labeled image this many times per epoch (TrainingRecords)
    compile: bool = False  # torch.compile the student (and its adapters)
    resume: bool = False
    # resume: a state saved for other inputs is replaced (compress: its run folder follows its options) rather than
    # refused (the distill command's --resume: the user asked for that run)
    start_over_if_changed: bool = False
    num_workers: int | None = None
    device: str = "auto"
    precision: str = "auto"  # the student's: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; see train_utils.Compute
    teacher_precision: str = "auto"  # the teachers' forward: auto is bf16 on CUDA and on CPUs with native bf16
    channels_last: bool | None = None  # None: on CUDA only

    def outcome_fields(self) -> dict[str, Any]:
        """The settings that decide the trained student; not where or how fast it is computed (cache/resume keys)."""
        fields = asdict(replace(self, resume=False, device="auto", num_workers=None, compile=False, channels_last=None))
        fields.pop("start_over_if_changed")  # how to resume, not what is trained (and keys made before it stay valid)
        fields["losses"] = [str(spec) for spec in self.losses]
        fields["default_recipe"] = recipe_fingerprint()  # what the None settings above resolve to
        return fields


def distill(teachers: list[TeacherResult], student_name: str, data: LoadedData, config: DistillConfig,
            out_dir: Path, *, start: StudentStart | None = None) -> StudentCheckpoint:
    """Train `student_name` from the teachers, from `start` (its starting weights, trained in place; default:
    random weights, see students.initial_student); write it under out_dir."""
    _check(teachers, config)
    out_dir = Path(out_dir)
    processes = start_processes(config.device)
    try:
        return _run(teachers, student_name, data, config, out_dir, start, processes)
    finally:
        finish_processes(processes)


def _check(teachers: list[TeacherResult], config: DistillConfig) -> None:
    if not teachers:
        raise EdgekdError("no teacher given; pass --teacher NAME or --teacher-dir DIR")
    classes = {t.num_classes for t in teachers}
    if len(classes) > 1:
        raise EdgekdError(f"the teachers predict different numbers of classes ({sorted(classes)}); "
                          "give teachers trained for the same classes")
    if config.teacher_weighting not in WEIGHTINGS:
        raise EdgekdError(f"unknown teacher weighting {config.teacher_weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    for option, value in (("--precision", config.precision), ("--teacher-precision", config.teacher_precision)):
        if value not in PRECISIONS:
            raise EdgekdError(f"unknown {option} {value!r}; use one of {', '.join(PRECISIONS)}")
    check_mix(config.mix, config.mix_alpha, config.mix_extra)
    if config.epochs <= 0 or config.batch_size < 2 or (config.temperature or 1.0) <= 0:
        raise EdgekdError("epochs and temperature must be positive and the batch size at least 2")


def _with_recipe_defaults(config: DistillConfig, transfer: bool) -> DistillConfig:
    """The settings left to edgekd (None) filled in from the default recipe (edgekd.recipe)."""
    start = default_for_start(transfer)
    augment = default_augment(config.epochs) if config.augment is None else config.augment
    if config.flip and augment:
        log.warning("--flip applies to fixed views; the random crop/flip of --augment flips images already")
    mix = start.mix if config.mix is None else config.mix
    mix_extra = (start.mix_extra if config.mix_extra is None else config.mix_extra) if mix != "none" else 0.0
    return replace(config, temperature=config.temperature or start.temperature,
                   lr=config.lr if config.lr is not None else start.lr, mix=mix, mix_extra=mix_extra,
                   augment=augment, flip=(MIRROR_FIXED_VIEWS if config.flip is None else config.flip) and not augment)


def _run(teachers: list[TeacherResult], student_name: str, data: LoadedData, config: DistillConfig, out_dir: Path,
         start: StudentStart | None, processes: Processes) -> StudentCheckpoint:
    seed_everything(config.seed)
    compute = Compute.choose(processes.device, config.precision, config.channels_last)
    teacher_compute = Compute.choose(processes.device, config.teacher_precision, config.channels_last, inference=True)
    device = compute.device
    log.info("distilling on %s (teacher forward: %s)%s", compute.describe(), teacher_compute.describe(),
             f", {processes.world} processes" if processes.world > 1 else "")
    per_rank_batch = config.batch_size // processes.world
    if per_rank_batch < 2 or config.batch_size % processes.world:
        raise EdgekdError(f"--batch-size {config.batch_size} does not split into {processes.world} processes of "
                          "2+ images each; use a multiple of the process count")

    image_size = config.image_size or teachers[0].preprocess.image_size
    if start is None:
        start = StudentStart(build_student(student_name, teachers[0].num_classes, image_size), "random", "random")
    student = start.model
    transfer = start.source != "random"  # the default recipe depends on it (edgekd.recipe)
    config = _with_recipe_defaults(config, transfer)
    objective = Objective(config.losses or default_loss_specs(data.info.labeled, transfer), config.temperature)
    objective.check_labels(data.info.labeled)
    student_pre = preprocess_for(student, image_size)
    teacher_models = [load_teacher_model(t) for t in teachers]
    hinted, tapped_teachers, pairs = wire_models(student, student_pre, teacher_models, teachers, objective, config,
                                                 compute, teacher_compute)

    records = training_records(data, config.labeled_repeat)
    if data.unlabeled is not None:
        log.info("training on %d labeled images (x%d per epoch) and %d unlabeled ones, shuffled together",
                 len(data.train), config.labeled_repeat, len(data.unlabeled))
    train_set = SeededItems(ModelInputs(records, [student_pre] + [t.preprocess for t in teachers],
                                        training=config.augment, evaluation=False), config.seed)
    drop_last = len(records) > config.batch_size
    sampler = EpochSampler(len(records), num_replicas=processes.world, rank=processes.rank, seed=config.seed,
                           drop_last=drop_last)
    loader = make_loader(train_set, per_rank_batch, shuffle=False, seed=config.seed, sampler=sampler,
                         num_workers=config.num_workers, device=device, drop_last=drop_last)
    steps_per_epoch = max(1, len(sampler) // per_rank_batch if drop_last else math.ceil(len(sampler) / per_rank_batch))
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    recipe = recipe_for(student, transfer=transfer, batch_size=config.batch_size, lr=config.lr,
                        layer_decay=config.layer_decay)
    optimizer = make_optimizer(student, recipe.lr, config.weight_decay, layer_decay=recipe.layer_decay,
                               extra=hinted.heads)
    scheduler = warmup_cosine(optimizer, total_steps, config.warmup_fraction)
    log.info("student starts from %s weights: %s", start.source, recipe.describe())
    micro = agree_on_minimum(processes, micro_batch_size(student, student_pre.input_size, per_rank_batch, compute))

    inputs = key_inputs("distill-training", {
        "config": config.outcome_fields(), "specs": [str(s) for s in objective.specs], "student": student_name,
        "start": start.fingerprint, "teachers": [sha256_file(t.weights_path) for t in teachers],
        "data": data_fingerprint(data), "world": processes.world})
    key = config_hash(inputs)
    state_path = out_dir / STATE_NAME
    if config.resume:
        state = resume_training_state(state_path, key, hinted, optimizer, scheduler, inputs,
                                      must_match=not config.start_over_if_changed)
    else:
        state = TrainState()
    cache = _teacher_cache(config, objective, records, teachers, processes)
    mirrors = MirrorDraw(len(records), config.seed) if config.flip else None
    model = DistributedDataParallel(hinted, device_ids=[device.index] if device.type == "cuda" else None) \
        if processes.world > 1 else hinted
    if config.compile:
        model = torch.compile(model)
    val_student = make_loader(ModelInputs(data.val, [student_pre], training=False), per_rank_batch * 2,
                              shuffle=False, num_workers=config.num_workers, device=device)

    loop = DistillLoop(model, tapped_teachers, objective, optimizer, scheduler, config, compute, teacher_compute,
                       cache, total_steps, micro, mirrors)
    epochs = math.ceil(total_steps / steps_per_epoch)
    started = time.perf_counter()

    def save() -> int | None:  # on an interrupt: the main process keeps the state (the step and the epoch's sums)
        if not processes.main:
            return None
        save_training_state(state_path, key, state, hinted, optimizer, scheduler, inputs)
        return state.step

    for epoch in range(len(state.history), epochs):  # the first epoch without its history entry (see finetune.py)
        skip_steps = state.step - epoch * steps_per_epoch
        sampler.set_position(epoch, skip_steps * per_rank_batch)
        epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch) - skip_steps
        with state_kept_on_interrupt(save, state_path):
            sums = loop.epoch(loader, epoch, epoch_steps, state, f"distill epoch {epoch + 1}/{epochs}", len(teachers))
        if cache is not None:
            cache.flush()
        metrics: dict[str, Any] = {"epoch": epoch + 1, **_epoch_metrics(sums, optimizer)}
        if processes.main:
            with state_kept_on_interrupt(save, state_path):  # every batch trained: a re-run only evaluates
                result = evaluate(hinted.student, val_student, compute, description="student val")
            metrics.update(val_top1=result.top1, val_top5=result.top5)
            log.info("distill epoch %d: loss %.4f, val top-1 %s", epoch + 1, metrics["loss"], _pct(result.top1))
        state.history.append(metrics)  # type: ignore[union-attr]
        state.partial = None
        if processes.main:
            save_training_state(state_path, key, state, hinted, optimizer, scheduler, inputs)
    seconds = time.perf_counter() - started
    sync_buffers(processes, hinted)
    final = _finish(hinted, loop, teachers, data, student_name, student_pre, config, pairs, state, out_dir,
                    val_student, seconds, processes, start.source) if processes.main else None
    return StudentCheckpoint.from_dict(share_from_main(processes, final))


def wire_models(student: torch.nn.Module, student_pre: Preprocess, teacher_models: list[torch.nn.Module],
                teachers: list[TeacherResult], objective: Objective, config: DistillConfig, compute: Compute,
                teacher_compute: Compute):
    """The student with its adapters and the frozen teachers, tapped at paired layers (only when a feature loss is
    on) and placed on the device in their precision's layout: (student, teachers, pairs per teacher)."""
    hinted, tapped, pairs = _wire_features(student, student_pre, teacher_models, teachers, objective, config)
    return compute.prepare(hinted), [teacher_compute.prepare(t).eval().requires_grad_(False) for t in tapped], pairs


def _wire_features(student: torch.nn.Module, student_pre: Preprocess, teacher_models: list[torch.nn.Module],
                   teachers: list[TeacherResult], objective: Objective, config: DistillConfig):
    """Tap the teachers and the student at paired layers (only when a feature loss is on) and build the adapters,
    and the embedding projectors when a loss uses them."""
    if not objective.needs_features:
        tapped = [TappedModel(m, ()) for m in teacher_models]
        return HintedStudent(student, [[] for _ in teachers], [[] for _ in teachers], student_pre.input_size,
                             embedding_widths=_embedding_widths(tapped, teachers, objective)), \
            tapped, [[] for _ in teachers]
    student_taps = list_taps(student, student_pre.input_size)
    pairs, tapped, shapes = [], [], []
    for model, result in zip(teacher_models, teachers):
        chosen = pair_layers(student_taps, list_taps(model, result.preprocess.input_size),
                             count=config.num_feature_pairs, named=config.feature_pairs)
        teacher_tapped = TappedModel(model, [t for _, t in chosen])
        pairs.append(chosen)
        tapped.append(teacher_tapped)
        shapes.append(feature_shapes(teacher_tapped, result.preprocess.input_size))
        log.info("feature pairs with %s: %s", result.model_name, ", ".join(f"{s.name}->{t.name}" for s, t in chosen))
    return HintedStudent(student, pairs, shapes, student_pre.input_size, adapt=objective.needs_hints,
                         embedding_widths=_embedding_widths(tapped, teachers, objective)), tapped, pairs


def _embedding_widths(tapped: list[TappedModel], teachers: list[TeacherResult], objective: Objective) -> list[int]:
    """Each teacher's embedding width, where a loss projects the student's embedding onto it (none otherwise)."""
    if not objective.needs_projector:
        return []
    return [embedding_width(model, result.preprocess.input_size) for model, result in zip(tapped, teachers)]


def _teacher_cache(config: DistillConfig, objective: Objective, records, teachers: list[TeacherResult],
                   processes: Processes) -> TeacherCache | None:
    if config.cache_teacher is False:
        return None
    new_views = config.augment or (config.mix != "none" and not config.mix_extra)  # no image is seen twice as it is
    if new_views or objective.needs_features:
        if config.cache_teacher:  # asked for by name: say why not; left to edgekd: nothing to say
            why = "augmentation shows the teacher a new view every epoch" if new_views else \
                "feature losses need the teacher's maps, too large to keep"
            log.warning("not caching teacher outputs: %s", why)
        return None
    key = stage_key("teacher-outputs", {"teachers": [sha256_file(t.weights_path) for t in teachers],
                                        "preprocess": [t.preprocess.to_dict() for t in teachers],
                                        "precision": config.teacher_precision, "records": records_fingerprint(records),
                                        "size": len(records), **({"mirror_images": True} if config.flip else {})})
    folder = teacher_cache_root() / key
    rows = len(records) * (2 if config.flip else 1)  # with --flip, two views per image (views.view_rows)
    if processes.main:  # one process creates the files; the others open them
        cache = TeacherCache(folder, rows, len(teachers))
    if processes.world > 1:
        torch.distributed.barrier()
    if not processes.main:
        cache = TeacherCache(folder, rows, len(teachers))
    log.info("teacher outputs cached in %s (fixed views, so each view's teacher output is the same every epoch): "
             "%d of %d views there already", folder, cache.cached, rows)
    return cache


class DistillLoop:
    """One training epoch at a time: teacher forward (inference mode), student forward, weighted losses, step."""

    def __init__(self, model, teachers, objective: Objective, optimizer, scheduler, config: DistillConfig,
                 compute: Compute, teacher_compute: Compute, cache: TeacherCache | None, total_steps: int,
                 micro_batch: int | None = None, mirrors: MirrorDraw | None = None):
        self.model, self.teachers, self.objective = model, teachers, objective
        self.optimizer, self.scheduler, self.config = optimizer, scheduler, config
        self.compute, self.teacher_compute = compute, teacher_compute
        self.cache, self.total_steps = cache, total_steps
        self.micro_batch = micro_batch  # None: the whole batch at once
        self.mirrors = mirrors  # None: no mirrored views (--no-flip, or the crop/flip, which flips already)

    def epoch(self, loader, epoch: int, steps: int, state: TrainState, label: str, n_teachers: int) -> dict[str, float]:
        """Train `steps` batches; returns the epoch's running sums (kept in state.partial for an interruption)."""
        self.model.train()
        sums: dict[str, Any] = dict(state.partial or {})
        started = time.perf_counter() - sums.get("seconds", 0.0)
        bar = progress(loader, total=steps, desc=label, unit="batch")
        try:
            for batch_index, batch in enumerate(bar):
                if batch_index >= steps:
                    break
                with interrupts_held():  # a step lands whole (weights, BatchNorm statistics, step count) or not
                    # img/s counts the loader's images: mixed images added to the batch (--mix-extra) are extra work
                    # on them, not progress through the data
                    images = len(batch[0])
                    total, terms = self.step(self.views(batch, n_teachers, epoch, state.step), n_teachers,
                                             state.step / self.total_steps)
                    state.step += 1
                    self.scheduler.step_update(state.step)
                    for name, value in {"loss": total, **terms, "steps": 1, "images": images}.items():
                        sums[name] = sums.get(name, 0.0) + value
                    sums["seconds"] = time.perf_counter() - started
                    state.partial = sums
                if batch_index % 10 == 0 or batch_index + 1 == steps:  # one device sync per 10 steps
                    check_finite(float(sums["loss"]), state.step, "distillation")
                    shown = {k: f"{float(sums[k]) / sums['steps']:.3f}" for k in ("loss", *terms)}
                    bar.set_postfix(refresh=False, **shown, img_s=f"{sums['images'] / sums['seconds']:.0f}")
        finally:
            bar.close()
        state.partial = {k: float(v) for k, v in sums.items()}
        return state.partial

    def views(self, batch: tuple, n_teachers: int, epoch: int, step: int) -> tuple:
        """The batch as the models see it: mirrored where drawn (views.py; each index then names its view's row in
        the teacher cache), then mixed. Done here, on the whole batch, so every memory-sized slice shares it."""
        if self.mirrors is not None:
            inputs, labels, indices = batch[:1 + n_teachers], batch[1 + n_teachers], batch[2 + n_teachers]
            flipped = self.mirrors.flipped(indices, epoch)
            batch = (*mirror(tuple(inputs), flipped), labels, view_rows(indices, flipped), *batch[3 + n_teachers:])
        return self.mixed(batch, n_teachers, step)

    def mixed(self, batch: tuple, n_teachers: int, step: int) -> tuple:
        """The batch with its images mixed (the same mix for every model) and the partners' labels and shares
        appended; unchanged without --mix. With --mix-extra the batch keeps its images as they are and the first
        extra x B of its mixed images are added after them (their cache index -1: the teacher answers them live)."""
        if self.config.mix == "none":
            return batch
        inputs, labels, indices = batch[:1 + n_teachers], batch[1 + n_teachers], batch[2 + n_teachers]
        mixed = mix_batch(tuple(inputs), labels, self.config.mix, self.config.mix_alpha, self.config.seed, step)
        if not self.config.mix_extra:
            return (*mixed.inputs, *batch[1 + n_teachers:], mixed.partner_labels, mixed.own_share)
        added = max(1, round(len(labels) * self.config.mix_extra))
        return (*(torch.cat([x, m[:added]]) for x, m in zip(inputs, mixed.inputs)),
                torch.cat([labels, labels[:added]]), torch.cat([indices, torch.full_like(indices[:added], -1)]),
                torch.cat([labels, mixed.partner_labels[:added]]),  # an image as it is is its own partner
                torch.cat([torch.ones_like(mixed.own_share), mixed.own_share[:added]]))

    def step(self, batch: tuple, n_teachers: int, progress_fraction: float) -> tuple[torch.Tensor, dict]:
        """One optimiser step on the batch, computed in memory-sized slices whose gradients accumulate (each
        slice's losses weighted by its share of the batch; relation losses see the pairs within a slice)."""
        size = len(batch[0])
        self.optimizer.zero_grad(set_to_none=True)
        total, terms = backward_in_slices(
            size, self.micro_batch,
            lambda part: self._losses(tuple(x[part] for x in batch), n_teachers, progress_fraction), self.model)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return total, terms

    def _losses(self, batch: tuple, n_teachers: int, progress_fraction: float) -> tuple[torch.Tensor, dict]:
        student_input = self.compute.inputs(batch[0])
        teacher_inputs = [self.teacher_compute.inputs(x) for x in batch[1:1 + n_teachers]]
        labels, indices = batch[1 + n_teachers].to(self.compute.device), batch[2 + n_teachers]
        partner_labels, own_share = (x.to(self.compute.device) for x in batch[3 + n_teachers:]) \
            if len(batch) > 3 + n_teachers else (None, None)
        teacher_out = self.teacher_outputs(teacher_inputs, indices)
        with self.compute.autocast():
            logits, embedding, raw, hints, projected = self.model(student_input)
        views = tuple(TeacherView(logits=t_logits, embedding=t_embedding, features=t_maps, student_features=raw[k],
                                  hints=hints[k], weight=weight, projected=projected[k])
                      for k, ((t_logits, t_embedding, t_maps), weight) in
                      enumerate(zip(teacher_out, self.teacher_weights([o[0] for o in teacher_out]))))
        return self.objective(LossInputs(logits.float(), embedding.float(), labels, views, partner_labels, own_share),
                              progress_fraction)

    def teacher_outputs(self, inputs: list[torch.Tensor], indices: torch.Tensor) -> list[tuple]:
        """Each teacher's (logits, embedding, maps) in fp32; with the cache, the teacher answers only the samples it
        has not answered before (all of them in the first epoch, a view not drawn yet after that) and the batch is
        read back from the cache."""
        if self.cache is None:
            return self._teacher_forward(inputs)
        live = indices.cpu() < 0  # mixed images (--mix-extra): new every step, never cached
        if bool(live.any()):
            return self._cached_and_live(inputs, indices, live)
        missing = self.cache.missing(indices)
        if bool(missing.any()):
            computed = self._teacher_forward([x[missing.to(x.device)] for x in inputs])
            self.cache.store(indices[missing], [(logits, embedding) for logits, embedding, _ in computed])
        return [(logits, embedding, ()) for logits, embedding in self.cache.read(indices, self.compute.device)]

    def _cached_and_live(self, inputs: list[torch.Tensor], indices: torch.Tensor, live: torch.Tensor) -> list[tuple]:
        """The cached rows from the cache, the live ones (index -1) from the teachers, in the batch's order."""
        computed = self._teacher_forward([x[live.to(x.device)] for x in inputs])
        if bool(live.all()):
            return computed
        cached = self.teacher_outputs([x[~live.to(x.device)] for x in inputs], indices[~live.to(indices.device)])
        order = torch.cat([torch.nonzero(~live).flatten(), torch.nonzero(live).flatten()])
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order))
        return [(torch.cat([c_logits, logits.to(c_logits.device)])[back.to(c_logits.device)],
                 torch.cat([c_embedding, embedding.to(c_embedding.device)])[back.to(c_embedding.device)], ())
                for (c_logits, c_embedding, _), (logits, embedding, _) in zip(cached, computed)]

    def _teacher_forward(self, inputs: list[torch.Tensor]) -> list[tuple]:
        with torch.inference_mode(), self.teacher_compute.autocast():
            outputs = [teacher(x) for teacher, x in zip(self.teachers, inputs)]
        # Inference tensors cannot take part in autograd; clones outside inference mode can.
        return [(logits.float().clone(), embedding.float().clone(), tuple(m.float().clone() for m in maps))
                for logits, embedding, maps in outputs]

    def teacher_weights(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each teacher's share of each sample: its top-class confidence (normalised over teachers), or equal."""
        if len(logits) == 1 or self.config.teacher_weighting == "mean":
            return [torch.full_like(logits[0][:, 0], 1.0 / len(logits)) for _ in logits]
        confidence = torch.stack([lg.softmax(dim=1).amax(dim=1) for lg in logits])
        return list(confidence / confidence.sum(dim=0, keepdim=True))


def _epoch_metrics(sums: dict[str, float], optimizer) -> dict[str, float]:
    steps = max(1.0, sums.get("steps", 0.0))
    out = {name: value / steps for name, value in sums.items() if name not in ("steps", "images", "seconds")}
    out.update(seconds=sums.get("seconds", 0.0), images_per_s=sums.get("images", 0.0) / max(1e-9, sums["seconds"]),
               lr=max(group["lr"] for group in optimizer.param_groups))  # the head's (layer-wise decay lowers others)
    return out


def _finish(hinted: HintedStudent, loop: DistillLoop, teachers: list[TeacherResult], data: LoadedData,
            student_name: str, student_pre: Preprocess, config: DistillConfig, pairs, state: TrainState,
            out_dir: Path, val_student, seconds: float, processes: Processes, student_init: str) -> dict[str, Any]:
    """Measure the student (accuracy, agreement with each teacher; the first's is the checkpoint's) and write
    weights, card and log (rank 0)."""
    compute, cache, objective = loop.compute, loop.cache, loop.objective
    device = compute.device
    result = evaluate(hinted.student, val_student, compute, description="student val")
    agreements = []
    for teacher_result, tapped in zip(teachers, loop.teachers):
        val_teacher = make_loader(ModelInputs(data.val, [teacher_result.preprocess], training=False),
                                  config.batch_size * 2 // processes.world, shuffle=False,
                                  num_workers=config.num_workers, device=device)
        teacher = evaluate(tapped.model, val_teacher, compute, description=f"{teacher_result.model_name} val")
        agreements.append(paired_agreement((teacher.indices, teacher.predictions.numpy()),
                                           (result.indices, result.predictions.numpy())))
    agreement = agreements[0]
    weights_path = out_dir / "student.safetensors"
    student_state = {k: v.detach().cpu().contiguous() for k, v in hinted.student.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(student_state, str(tmp), metadata={"architecture": student_name})  # read by --student-checkpoint
    metrics = {"losses": [str(s) for s in objective.specs], "temperature": objective.temperature,
               "epochs": config.epochs, "seed": config.seed, "train_images": len(data.train),
               "unlabeled_images": len(data.unlabeled) if data.unlabeled is not None else 0,
               "labeled_repeat": config.labeled_repeat, "augment": config.augment, "flip": config.flip,
               "mix": config.mix, "mix_alpha": config.mix_alpha, "mix_extra": config.mix_extra,
               "teachers": [t.model_name for t in teachers], "teacher_val_top1": teachers[0].val_top1,
               "teacher_agreements": agreements,  # with each teacher, in the order of "teachers"
               "feature_pairs": [[f"{s.name}->{t.name}" for s, t in chosen] for chosen in pairs],
               "teacher_cache": cache is not None, "processes": processes.world,
               # views (images; with --flip, images and mirror images) whose teacher outputs came from the cache /
               # were computed (this process, this run)
               "teacher_cache_hits": cache.hits if cache else 0, "teacher_cache_misses": cache.misses if cache else 0,
               "compute": compute.describe(),
               "teacher_compute": loop.teacher_compute.describe(),
               "compiled": config.compile, "seconds": seconds, "student_init": student_init}
    checkpoint = StudentCheckpoint(model_name=student_name, weights_path=weights_path,
                                   num_classes=teachers[0].num_classes, class_names=teachers[0].class_names,
                                   preprocess=student_pre, val_top1=result.top1, val_top5=result.top5,
                                   teacher_agreement=agreement, metrics=metrics)
    write_json_atomic(out_dir / "student.json", {**checkpoint.to_dict(), "weights_path": weights_path.name})
    write_json_atomic(out_dir / "distill_log.json", {**metrics, "val_top1": result.top1, "val_top5": result.top5,
                                                     "teacher_agreement": agreement, "epoch_log": state.history})
    log.info("student %s: val top-1 %s, agreement with %s -> %s", student_name, _pct(result.top1),
             agreement_text(teachers, agreements), weights_path)
    return checkpoint.to_dict()


def agreement_text(teachers: list[TeacherResult], agreements: list[float | None]) -> str:
    """"resnet18 91.20%", or with several teachers "resnet18 91.20%, vit_tiny 88.00%"."""
    return ", ".join(f"{t.model_name} {'n/a' if a is None else f'{100 * a:.2f}%'}"
                     for t, a in zip(teachers, agreements))


def _pct(value: float | None) -> str:
    return "n/a (no labels)" if value is None else f"{100 * value:.2f}%"
