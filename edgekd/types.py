"""Frozen dataclasses passed between stages. No logic beyond (de)serialisation helpers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its pixels: timm's data config, plus the channel count it was built for."""

    input_size: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=tuple(raw["input_size"]),  # type: ignore[arg-type]
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            interpolation=raw.get("interpolation", "bilinear"),
            crop_pct=float(raw.get("crop_pct", 1.0)),
            crop_mode=raw.get("crop_mode", "center"),
        )


@dataclass(frozen=True)
class DataSpec:
    """What the user asked for with --data."""

    source: str  # "fashion-mnist" or a folder path
    fashion_mnist_root: Path | None = None
    val_fraction: float = 0.2  # used only when the folder has no train/ + val/ (or test/) split
    seed: int = 0
    max_train: int | None = None  # a stratified, seeded subset for quick runs; None = all
    max_val: int | None = None
    unlabeled: tuple[str, ...] = ()  # --unlabeled-data folders: extra images the student learns from the teacher alone

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataSpec:
        """The spec a run recorded in run.json (its `asdict`, paths as strings): every field, so a run's validation
        split is the one it was trained beside (`val_fraction`, `seed`) and never overlaps its training images."""
        root = raw.get("fashion_mnist_root")
        return cls(source=raw["source"], fashion_mnist_root=Path(root) if root else None,
                   val_fraction=float(raw.get("val_fraction", cls.val_fraction)), seed=int(raw.get("seed", cls.seed)),
                   max_train=raw.get("max_train"), max_val=raw.get("max_val"),
                   unlabeled=tuple(raw.get("unlabeled", ())))


@dataclass(frozen=True)
class DatasetInfo:
    """What --data turned out to contain."""

    source: str
    class_names: tuple[str, ...]  # empty for an unlabeled folder
    labeled: bool
    num_train: int
    num_val: int
    skipped_corrupt: int = 0
    num_unlabeled: int = 0  # --unlabeled-data images (distillation only; never the teacher's fine-tuning)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class TeacherSpec:
    """One --teacher and how to get its weights."""

    name: str  # an alias or a timm model name; resolved by models.resolve_model_name
    checkpoint: Path | None = None
    random_init: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Plain supervised training (teacher fine-tuning)."""

    epochs: float = 2.0  # fractional epochs are allowed for quick runs
    batch_size: int = 128  # the optimiser's batch; computed in memory-sized slices (train_utils.micro_batch_size)
    lr: float | None = None  # the head's peak rate; None: train_utils.recipe_for's default for the start
    layer_decay: float | None = None  # per-layer rate decay; None: likewise
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int | None = None  # None: chosen from the machine
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; see train_utils.Compute
    channels_last: bool | None = None  # None: on CUDA only

    def outcome_fields(self) -> dict[str, Any]:
        """The settings that decide the trained weights; not where or how fast they are computed (cache keys)."""
        return asdict(replace(self, num_workers=None, device="auto", channels_last=None))


@dataclass(frozen=True)
class TeacherResult:
    """A teacher ready to distil: weights on disk, its preprocessing and its measured accuracy."""

    model_name: str
    weights_path: Path  # safetensors state_dict with the data's head
    num_classes: int
    class_names: tuple[str, ...]
    preprocess: Preprocess
    weights_source: str  # "pretrained", "checkpoint:<path>" or "random"
    fine_tuned: bool
    val_top1: float | None  # None when the data has no labels
    val_top5: float | None = None
    params: int = 0
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weights_path"] = str(self.weights_path)
        out["preprocess"] = self.preprocess.to_dict()
        out["history"] = list(self.history)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TeacherResult:
        return cls(
            model_name=raw["model_name"],
            weights_path=Path(raw["weights_path"]),
            num_classes=int(raw["num_classes"]),
            class_names=tuple(raw["class_names"]),
            preprocess=Preprocess.from_dict(raw["preprocess"]),
            weights_source=raw["weights_source"],
            fine_tuned=bool(raw["fine_tuned"]),
            val_top1=raw.get("val_top1"),
            val_top5=raw.get("val_top5"),
            params=int(raw.get("params", 0)),
            history=tuple(raw.get("history", ())),
        )


@dataclass(frozen=True)
class Artifact:
    """One file a stage produced; manifest.json is a list of these."""

    stage: str
    path: str  # relative to the run folder
    sha256: str
    parent: str | None = None  # the artifact path it was made from
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudentCheckpoint:
    """A trained student on disk: what export, quantization and bench need to rebuild and run it.

    Saved as <dir>/student.safetensors (weights) + <dir>/student.json (this object, via to_dict).
    """

    model_name: str  # a name students.build_student understands (a timm name, or a teacher-derived name)
    weights_path: Path
    num_classes: int
    class_names: tuple[str, ...]
    preprocess: Preprocess
    val_top1: float | None = None
    val_top5: float | None = None
    teacher_agreement: float | None = None  # top-1 agreement with the (first) teacher on the validation split
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weights_path"] = str(self.weights_path)
        out["preprocess"] = self.preprocess.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudentCheckpoint:
        return cls(model_name=raw["model_name"], weights_path=Path(raw["weights_path"]),
                   num_classes=int(raw["num_classes"]), class_names=tuple(raw["class_names"]),
                   preprocess=Preprocess.from_dict(raw["preprocess"]), val_top1=raw.get("val_top1"),
                   val_top5=raw.get("val_top5"), teacher_agreement=raw.get("teacher_agreement"),
                   metrics=dict(raw.get("metrics", {})))
