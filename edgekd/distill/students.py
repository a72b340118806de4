"""Student architectures: timm models by name, and shallower students derived from the teacher's own architecture.

A derived student is named "derived:<teacher timm name>:depth=<fraction>", e.g.
"derived:vit_base_patch16_224:depth=0.5" (a ViT-B keeping every other block). The name alone rebuilds the
architecture, so distillation, export and bench rebuild it from StudentCheckpoint.model_name like any timm name;
`derive_from_teacher` builds it initialised from the teacher's weights, the usual start for distillation.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from edgekd.artifacts import sha256_file
from edgekd.errors import EdgekdError
from edgekd.models import (create_model, fetch_pretrained, fixed_input_size, load_weights, locate_pretrained,
                           preprocess_for, read_state_dict, resolve_model_name)
from edgekd.types import StudentCheckpoint

log = logging.getLogger(__name__)

DERIVED_PREFIX = "derived:"
_DERIVED_RE = re.compile(r"^derived:(?P<teacher>[^:]+):depth=(?P<depth>[0-9.]+)$")


@dataclass(frozen=True)
class DerivedSpec:
    """A shallower copy of the teacher: each run of repeated blocks keeps `depth` of its blocks, evenly spaced."""

    teacher: str  # timm architecture name
    depth: float  # fraction of blocks kept, 0 < depth < 1

    @property
    def name(self) -> str:
        return f"{DERIVED_PREFIX}{self.teacher}:depth={self.depth:g}"


def derived_name(teacher: str, depth: float) -> str:
    """The canonical derived-student name (teacher alias resolved), validated."""
    spec = parse_derived(f"{DERIVED_PREFIX}{teacher}:depth={depth:g}")
    assert spec is not None
    return spec.name


def parse_derived(name: str) -> DerivedSpec | None:
    """The spec of a derived-student name; None for a plain timm name; an error for a malformed derived name."""
    if not name.startswith(DERIVED_PREFIX):
        return None
    match = _DERIVED_RE.match(name.strip())
    depth = float(match["depth"]) if match and match["depth"].count(".") <= 1 else -1.0
    if not match or not 0.0 < depth < 1.0:
        raise EdgekdError(f"bad derived student name {name!r}; write derived:<teacher>:depth=<fraction in (0, 1)>, "
                          "e.g. derived:vit_base_patch16_224:depth=0.5")
    return DerivedSpec(teacher=resolve_model_name(match["teacher"]), depth=depth)


def build_student(name: str, num_classes: int, image_size: tuple[int, int] | None) -> torch.nn.Module:
    """The architecture of student `name` (randomly initialised): a timm name or a derived-student name. For the
    starting weights of a student about to be trained, see `initial_student`."""
    spec = parse_derived(name)
    if spec is None:
        return create_model(resolve_model_name(name), num_classes, image_size)
    return shallower(create_model(spec.teacher, num_classes, image_size), spec, image_size)


def derive_from_teacher(name: str, teacher_state: dict[str, torch.Tensor], num_classes: int,
                        image_size: tuple[int, int] | None) -> torch.nn.Module:
    """The derived student `name` with the teacher's weights in every layer it keeps (the head too, when the
    class count matches); the same architecture `build_student(name, ...)` gives."""
    spec = parse_derived(name)
    if spec is None:
        raise EdgekdError(f"{name!r} is not a teacher-derived student name (derived:<teacher>:depth=<fraction>)")
    model = create_model(spec.teacher, num_classes, image_size)
    load_weights(model, teacher_state, f"of teacher {spec.teacher}", allow_head_mismatch=True)
    return shallower(model, spec, image_size)


@dataclass(frozen=True)
class StudentInit:
    """Where students start from: --student-pretrained (default on) and --student-checkpoint."""

    pretrained: bool = True  # timm's published weights when they can be had; off: every student starts random
    checkpoint: Path | None = None  # a state_dict for the (pinned) student

    def start_kind(self, name: str, pinned: str | None = None) -> str:
        """What `name` would start from, without loading anything: "checkpoint", "teacher-derived", "pretrained"
        or "random" (the selection rule ranks real starting weights first)."""
        if self.checkpoint is not None and name == pinned:
            return "checkpoint"
        if not self.pretrained:
            return "random"
        if parse_derived(name) is not None:
            return "teacher-derived"
        return "pretrained" if locate_pretrained(resolve_model_name(name)) is not None else "random"


@dataclass
class StudentStart:
    """A student module with its starting weights, and what they are (report.json's distillation.student_init)."""

    model: torch.nn.Module
    source: str  # "pretrained", "checkpoint:<path>", "teacher-derived" or "random"
    fingerprint: str  # see start_fingerprint


def start_fingerprint(name: str, init: StudentInit, *, teacher_weights: Path | None = None) -> str:
    """What student `name` starts from, by content (sha256 of the weights file): part of the distillation stage's
    cache and resume keys, so other starting weights are never answered with an old student."""
    kind = init.start_kind(name, pinned=name)
    if kind == "checkpoint":
        return f"checkpoint:{sha256_file(init.checkpoint)}"
    if kind == "teacher-derived":
        return f"teacher-derived:{sha256_file(teacher_weights) if teacher_weights else '?'}"
    if kind == "pretrained":
        located = fetch_pretrained(resolve_model_name(name))
        return f"pretrained:{located.hub_id}:{sha256_file(located.file)}" if located and located.file else "random"
    return "random"


def initial_student(name: str, num_classes: int, image_size: tuple[int, int] | None, init: StudentInit, *,
                    teacher_weights: Path | None = None, seed: int = 0) -> StudentStart:
    """The student `name` with its starting weights: the checkpoint when given, the teacher's for a
    teacher-derived student, timm's pretrained weights when they can be had, else random (said in the log).
    Weights that are not loaded (a new head, a random student) are drawn from `seed`, so a run is repeatable."""
    torch.manual_seed(seed)
    kind = init.start_kind(name, pinned=name)
    fingerprint = start_fingerprint(name, init, teacher_weights=teacher_weights)
    if kind == "checkpoint":
        model = build_student(name, num_classes, image_size)
        if load_weights(model, read_state_dict(init.checkpoint), str(init.checkpoint), allow_head_mismatch=True):
            log.info("student %s: new classifier (the checkpoint's head has another class count)", name)
        return StudentStart(model, f"checkpoint:{init.checkpoint}", fingerprint)
    if kind == "teacher-derived":
        if teacher_weights is None:
            raise EdgekdError(f"{name} starts from its teacher's weights; give the teacher "
                              "(--teacher-dir or --teacher)")
        log.info("student %s starts from the teacher's own weights", name)
        return StudentStart(derive_from_teacher(name, load_file(str(teacher_weights)), num_classes, image_size),
                            "teacher-derived", fingerprint)
    if kind == "pretrained":
        log.info("student %s starts from timm's pretrained weights (%s)", name, fingerprint.rsplit(":", 1)[0])
        return StudentStart(create_model(resolve_model_name(name), num_classes, image_size, pretrained=True),
                            "pretrained", fingerprint)
    if init.pretrained:
        log.warning("student %s starts from RANDOM weights: timm's pretrained weights for it are not in the local "
                    "Hugging Face cache and the hub is unreachable; give weights with --student-checkpoint PATH", name)
    return StudentStart(build_student(name, num_classes, image_size), "random", fingerprint)


def check_student_checkpoint(name: str, state: dict[str, torch.Tensor], path: Path) -> None:
    """Fail now, before data is read or a teacher trained, when the checkpoint does not fit `name` (head aside).
    Fixed-size models (ViTs) are checked when built at the run's input size instead."""
    spec = parse_derived(name)
    if fixed_input_size(spec.teacher if spec else resolve_model_name(name)):
        return
    load_weights(build_student(name, 1000, None), state, str(path), allow_head_mismatch=True)


def checkpoint_architecture(path: Path) -> str | None:
    """The timm architecture a student checkpoint holds, when the file or its folder says so: safetensors metadata
    ("architecture", as edgekd writes it), a config.json beside it (timm / Hugging Face hub layout), a student.json
    beside it (edgekd's), or a .pth dict's "arch" entry when that is a timm name. None when nothing says."""
    path = Path(path)
    named: list[str | None] = []
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            named.append((handle.metadata() or {}).get("architecture"))
    for sidecar, key in (("config.json", "architecture"), ("student.json", "model_name")):
        if (path.parent / sidecar).is_file():
            try:
                named.append(json.loads((path.parent / sidecar).read_text()).get(key))
            except (OSError, json.JSONDecodeError):
                pass
    if path.suffix != ".safetensors" and path.is_file():
        raw = torch.load(path, map_location="cpu", weights_only=True)
        named.append(raw.get("arch") if isinstance(raw, dict) and isinstance(raw.get("arch"), str) else None)
    for name in named:
        if not name:
            continue
        try:
            parse_derived(name) or resolve_model_name(name)
            return name
        except EdgekdError:
            continue
    return None


def shallower(model: torch.nn.Module, spec: DerivedSpec, image_size: tuple[int, int] | None) -> torch.nn.Module:
    """Drop blocks in place: in every nn.Sequential run of same-class blocks whose blocks after the first keep
    their input's shape (transformer blocks, residual CNN blocks), keep `spec.depth` of them, evenly spaced and
    always the first (it may downsample). Shape-changing containers are descended into, never shortened."""
    model = model.eval()
    sample = torch.zeros(1, *preprocess_for(model, image_size).input_size)
    preserving = _shape_preserving_modules(model, sample)
    renames: dict[str, dict[int, int]] = {}
    _prune(model, "", spec.depth, preserving, renames)
    if not renames:
        raise EdgekdError(f"cannot derive a shallower student from {spec.teacher}: it has no runs of repeated "
                          "shape-preserving blocks; pick a timm student instead")
    _rename_feature_info(model, renames)
    with torch.no_grad():
        model(sample)  # the shortened model must still run end to end
    return model


def _shape_preserving_modules(model: torch.nn.Module, sample: torch.Tensor) -> set[int]:
    """ids of modules whose (first) call returned a tensor shaped like its first input."""
    preserving: set[int] = set()
    seen: set[int] = set()

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor) \
                and args[0].shape == output.shape:
            preserving.add(id(module))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return preserving


def _prune(module: torch.nn.Module, prefix: str, depth: float, preserving: set[int],
           renames: dict[str, dict[int, int]]) -> None:
    for child_name, child in list(module.named_children()):
        path = f"{prefix}{child_name}"
        blocks = list(child.children())
        repeated = isinstance(child, torch.nn.Sequential) and len(blocks) >= 2 \
            and len({type(b) for b in blocks}) == 1 and not isinstance(blocks[0], torch.nn.Sequential)
        if repeated and all(id(b) in preserving for b in blocks[1:]):
            keep = sorted({round(i * len(blocks) / max(1, round(len(blocks) * depth)))
                           for i in range(max(1, round(len(blocks) * depth)))})
            setattr(module, child_name, torch.nn.Sequential(*[blocks[i] for i in keep]))
            renames[path] = {old: new for new, old in enumerate(keep)}
        else:
            _prune(child, f"{path}.", depth, preserving, renames)


def _rename_feature_info(model: torch.nn.Module, renames: dict[str, dict[int, int]]) -> None:
    """Keep timm's feature_info (used for feature taps) pointing at blocks that still exist."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return
    updated = []
    for entry in info:
        module_path = entry.get("module", "") if isinstance(entry, dict) else ""
        head, _, index = module_path.rpartition(".")
        if head in renames and index.isdigit():
            if int(index) not in renames[head]:
                continue
            entry = {**entry, "module": f"{head}.{renames[head][int(index)]}"}
        updated.append(entry)
    model.feature_info = updated


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
