"""Teachers: a timm model with real weights, fitted to the data's classes and measured before distillation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import timm
import torch
from safetensors.torch import load_file, save_file

from edgekd.artifacts import atomic_path, make_artifact, sha256_file, write_json_atomic
from edgekd.data import LoadedData, ModelInputs, make_loader, readable_count
from edgekd.errors import EdgekdError
from edgekd.distill.finetune import train_classifier
from edgekd.metrics import indistinguishable_from_chance
from edgekd.record import data_fingerprint, stage_key
from edgekd.models import (classifier_keys, count_params, create_model, fetch_pretrained, fitted_state,
                           load_weights, preprocess_for, read_state_dict, require_pretrained, resolve_model_name,
                           strip_wrapper_prefix)
from edgekd.distill.train_utils import Compute, evaluate, pick_device, seed_everything
from edgekd.types import TeacherResult, TeacherSpec, TrainConfig

log = logging.getLogger(__name__)

RESULT_NAME = "teacher.json"
WEIGHTS_NAME = "teacher.safetensors"
NO_TEACHER = "no teacher given; pass --teacher NAME (e.g. --teacher vit_base)"


def build_teacher(spec: TeacherSpec, num_classes: int, image_size: tuple[int, int] | None) -> tuple[
        torch.nn.Module, str, bool]:
    """Create the teacher with its weights. Returns (model, where the weights came from, head is fresh)."""
    model_name = resolve_model_name(spec.name)
    if spec.checkpoint is not None:
        model = create_model(model_name, num_classes, image_size, pretrained=False)
        state = read_state_dict(spec.checkpoint)
        fresh_head = load_weights(model, state, str(spec.checkpoint), allow_head_mismatch=True)
        return model, f"checkpoint:{spec.checkpoint}", fresh_head
    if spec.random_init:
        return create_model(model_name, num_classes, image_size, pretrained=False), "random", True
    model = create_model(model_name, num_classes, image_size, pretrained=True)
    # timm re-initialises the classifier when num_classes differs from the pretrained head's.
    return model, "pretrained", num_classes != model.pretrained_cfg.get("num_classes", num_classes)


@dataclass(frozen=True)
class TeacherOutline:
    """What choosing a student needs of the teacher (its architecture, head and input size), known before its
    weights are loaded or fine-tuned."""

    model_name: str
    num_classes: int
    image_size: tuple[int, int]

    @classmethod
    def of(cls, teacher: TeacherResult) -> TeacherOutline:
        return cls(teacher.model_name, teacher.num_classes, teacher.preprocess.image_size)


def outline_teacher(spec: TeacherSpec, data: LoadedData, image_size: tuple[int, int] | None) -> TeacherOutline:
    """The teacher as prepare_teacher will make it, without its weights: compress chooses the student first, so a
    budget no student meets is said before a fine-tune that can take hours. Its weights are checked to be at hand
    (the same error as loading them), and the model is built on the meta device (no memory) for its input size."""
    model_name = resolve_model_name(spec.name)
    if spec.checkpoint is None and not spec.random_init:
        require_pretrained(model_name)
    # unreadable or unsafe: said now, not after the selection; read once for the class count and the check below
    state = read_state_dict(spec.checkpoint) if spec.checkpoint is not None else None
    num_classes = _class_count(spec, data, image_size, state)
    with torch.device("meta"):
        model = create_model(model_name, num_classes, image_size)
    fresh_head = spec.random_init
    if state is not None:  # a checkpoint of another model: said now too
        _, fresh_head = fitted_state(model, state, str(spec.checkpoint), allow_head_mismatch=True)
    if fresh_head and not data.info.labeled:
        raise EdgekdError(_no_head_without_labels(model_name))
    return TeacherOutline(model_name, num_classes, preprocess_for(model, image_size).image_size)


def prepare_teacher(spec: TeacherSpec, data: LoadedData, out_dir: Path, *, image_size: tuple[int, int] | None,
                    train_config: TrainConfig, run_dir: Path | None = None,
                    before_making: Callable[[], None] | None = None) -> TeacherResult:
    """Load the teacher, fine-tune it when its head does not fit the data, measure it, save it under out_dir.

    A finished teacher whose inputs are unchanged is loaded from out_dir instead of being made again;
    `before_making` is called when it is not (compress moves its previous report aside then).
    """
    out_dir = Path(out_dir)
    weights = _weights_identity(spec)
    # by content: the starting weights' sha256 (not the checkpoint's path) and the data's fingerprint
    key = stage_key("teacher", {"model": resolve_model_name(spec.name), "weights": weights,
                                "random_init": spec.random_init, "data": data_fingerprint(data, unlabeled=False),
                                "classes": data.info.class_names, "size": image_size,
                                "train": train_config.outcome_fields()})
    cached = _load_cached(out_dir, key)
    if cached is not None:
        log.info("teacher %s: reusing %s (val top-1 %s)", cached.model_name, out_dir / WEIGHTS_NAME,
                 _pct(cached.val_top1))
        return cached
    if before_making is not None:
        before_making()

    labeled = data.info.labeled
    num_classes = _class_count(spec, data, image_size)
    seed_everything(train_config.seed)  # a fresh head (or a random model) starts from the same weights every run
    model, source, fresh_head = build_teacher(spec, num_classes, image_size)  # a new head on real weights is zero
    model_name = resolve_model_name(spec.name)
    preprocess = preprocess_for(model, image_size)
    history: list[dict[str, float]] = []
    if fresh_head:
        if not labeled:
            raise EdgekdError(_no_head_without_labels(model_name))
        why = "random weights" if source == "random" else f"its head does not match the {num_classes} classes"
        log.info("fine-tuning teacher %s on %s (%s), %g epoch(s)", model_name, data.info.source, why,
                 train_config.epochs)
        model, history = train_classifier(model, data, preprocess, train_config, out_dir, label="teacher",
                                          transfer=source != "random", identity=key)
    if history:  # fine-tuning just measured it on the validation split
        top1, top5 = history[-1]["val_top1"], history[-1]["val_top5"]
    else:
        log.info("teacher %s: the %s head fits the %d classes: used as it is, not fine-tuned", model_name,
                 "checkpoint's" if source.startswith("checkpoint") else "pretrained", num_classes)
        top1, top5 = measure_accuracy(model, data, preprocess, train_config)

    weights_path = out_dir / WEIGHTS_NAME
    with atomic_path(weights_path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"architecture": model_name})
    class_names = data.info.class_names or tuple(f"class_{i}" for i in range(num_classes))
    result = TeacherResult(model_name=model_name, weights_path=weights_path, num_classes=num_classes,
                           class_names=class_names, preprocess=preprocess, weights_source=source,
                           fine_tuned=bool(history), val_top1=top1, val_top5=top5,
                           params=count_params(model), history=tuple(history))
    write_json_atomic(out_dir / RESULT_NAME, {"key": key, "weights_sha256": sha256_file(weights_path),
                                              **result.to_dict()})
    if run_dir is not None:
        make_artifact(run_dir, "teacher", weights_path, parent=str(spec.checkpoint) if spec.checkpoint else None,
                      config={"model": model_name, "weights": source, "input_size": list(preprocess.input_size)},
                      metrics={"val_top1": top1, "val_top5": top5, "params": result.params})
    log.info("teacher %s ready: val top-1 %s on %d images", model_name, _pct(top1), readable_count(data.val))
    if indistinguishable_from_chance(top1, num_classes, readable_count(data.val)):
        log.warning("the teacher's val top-1 (%s) is no better than guessing among %d classes: it has nothing to "
                    "teach; train it longer (compress's --teacher-epochs, train-teacher's --epochs) or on more images",
                    _pct(top1), num_classes)
    return result


def measure_accuracy(model: torch.nn.Module, data: LoadedData, preprocess, config: TrainConfig) -> tuple[
        float | None, float | None]:
    compute = Compute.choose(pick_device(config.device), config.precision, config.channels_last)
    loader = make_loader(ModelInputs(data.val, [preprocess], training=False), config.batch_size * 2,
                         shuffle=False, num_workers=config.num_workers, device=compute.device)
    measured = evaluate(compute.prepare(model), loader, compute, description="teacher val")
    model.cpu()
    return measured.top1, measured.top5


def load_teacher_model(result: TeacherResult) -> torch.nn.Module:
    """The prepared teacher as an eval-mode module (weights from our own safetensors file)."""
    model = create_model(result.model_name, result.num_classes, result.preprocess.image_size)
    model.load_state_dict(load_file(str(result.weights_path)))
    return model.eval()


def prepare_teachers(specs: list[TeacherSpec], data: LoadedData, out_dir: Path, *,
                     image_size: tuple[int, int] | None, train_config: TrainConfig,
                     run_dir: Path | None = None, before_making: Callable[[], None] | None = None,
                     ) -> list[TeacherResult]:
    """Several teachers (for multi-teacher distillation), each in its own folder."""
    if not specs:
        raise EdgekdError(NO_TEACHER)
    if len(specs) == 1:
        return [prepare_teacher(specs[0], data, out_dir, image_size=image_size, train_config=train_config,
                                run_dir=run_dir, before_making=before_making)]
    return [prepare_teacher(spec, data, Path(out_dir) / f"{i}-{resolve_model_name(spec.name)}", image_size=image_size,
                            train_config=replace(train_config, seed=train_config.seed + i), run_dir=run_dir,
                            before_making=before_making)
            for i, spec in enumerate(specs)]


def _weights_identity(spec: TeacherSpec) -> str | None:
    """The teacher's starting weights by content (cache key): a changed checkpoint or cached download is new."""
    if spec.random_init:
        return None
    if spec.checkpoint is not None:
        return sha256_file(spec.checkpoint) if Path(spec.checkpoint).is_file() else None
    located = fetch_pretrained(resolve_model_name(spec.name))
    return sha256_file(located.file) if located is not None and located.file else None


def _no_head_without_labels(model_name: str) -> str:
    return (f"teacher {model_name} has no classifier for this data and the data has no labels; give a "
            "--teacher-checkpoint trained for your classes, or labeled class folders")


def _class_count(spec: TeacherSpec, data: LoadedData, image_size: tuple[int, int] | None,
                 checkpoint_state: dict[str, torch.Tensor] | None = None) -> int:
    """The teacher's head: the data's classes, or without labels its own (`checkpoint_state`: the checkpoint's
    tensors when the caller has read them already; else they are read here when needed)."""
    if data.info.labeled:
        return data.info.num_classes
    return _unlabeled_class_count(spec, image_size, checkpoint_state)


def _unlabeled_class_count(spec: TeacherSpec, image_size: tuple[int, int] | None,
                           checkpoint_state: dict[str, torch.Tensor] | None = None) -> int:
    """Without labels, keep the teacher's own head: its class count comes from the checkpoint or timm config."""
    if spec.checkpoint is not None:
        with torch.device("meta"):  # its key names only
            probe = create_model(resolve_model_name(spec.name), 1, image_size)
        read = checkpoint_state if checkpoint_state is not None else read_state_dict(spec.checkpoint)
        state = strip_wrapper_prefix(read, probe.state_dict())
        weights = [k for k in classifier_keys(probe) if k.endswith("weight") and k in state]
        if weights:
            return int(state[weights[-1]].shape[0])
    cfg = timm.get_pretrained_cfg(resolve_model_name(spec.name), allow_unregistered=True)
    return int(getattr(cfg, "num_classes", 1000) or 1000)


def read_teacher_result(folder: Path) -> TeacherResult:
    """A teacher prepared earlier (e.g. by `edgekd train-teacher`), from its folder; its weights beside teacher.json."""
    path = Path(folder) / RESULT_NAME
    if not path.is_file() or not (Path(folder) / WEIGHTS_NAME).is_file():
        raise EdgekdError(f"no prepared teacher in {folder} ({RESULT_NAME} + {WEIGHTS_NAME}); "
                          "make one with `edgekd train-teacher --out DIR` and pass that DIR")
    raw = json.loads(path.read_text())
    raw.pop("key", None)
    if not _weights_as_written(Path(folder), raw.pop("weights_sha256", None)):
        raise EdgekdError(f"{Path(folder) / WEIGHTS_NAME} changed since `edgekd train-teacher` wrote it (damaged or "
                          "edited); run train-teacher again")
    return replace(TeacherResult.from_dict(raw), weights_path=Path(folder) / WEIGHTS_NAME)


def _load_cached(out_dir: Path, key: str) -> TeacherResult | None:
    path = out_dir / RESULT_NAME
    if not path.exists() or not (out_dir / WEIGHTS_NAME).exists():
        return None
    raw = json.loads(path.read_text())
    if raw.pop("key", None) != key:
        return None
    if not _weights_as_written(out_dir, raw.pop("weights_sha256", None)):
        log.warning("teacher: %s changed since it was written (damaged or edited); making it again",
                    out_dir / WEIGHTS_NAME)
        return None
    return replace(TeacherResult.from_dict(raw), weights_path=out_dir / WEIGHTS_NAME)  # the run folder may have moved


def _weights_as_written(folder: Path, recorded: str | None) -> bool:
    """Whether the teacher's weights in `folder` still have the sha256 teacher.json recorded when they were written
    (None: a teacher.json from before it kept one)."""
    return recorded is None or recorded == sha256_file(folder / WEIGHTS_NAME)


def _pct(value: float | None) -> str:
    return "n/a (no labels)" if value is None else f"{100 * value:.2f}%"
