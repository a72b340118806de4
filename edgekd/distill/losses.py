"""Distillation losses: one class per loss, registered by name, combined as a weighted (and scheduled) sum.

Response losses compare logits, feature losses compare intermediate maps, relation losses compare how a batch's
embeddings relate to each other. Every teacher-facing loss is computed against each teacher and combined with
per-sample teacher weights, so one code path serves one teacher and an ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from edgekd.errors import EdgekdError
from edgekd.recipe import default_for_start


@dataclass(frozen=True)
class TeacherView:
    """One teacher's outputs for a batch, next to the student's matching features."""

    logits: Tensor  # (B, K)
    embedding: Tensor  # (B, Dt) pooled pre-logits
    features: tuple[Tensor, ...]  # teacher maps, one per feature pair
    student_features: tuple[Tensor, ...]  # the student's raw maps for the same pairs (attention transfer)
    hints: tuple[Tensor, ...]  # the student's maps through this teacher's adapters, shaped like `features`
    weight: Tensor  # (B,) this teacher's share of each sample; shares sum to 1 over teachers
    projected: Tensor | None = None  # (B, Dt) the student's embedding through its projector onto this teacher's


@dataclass(frozen=True)
class LossInputs:
    student_logits: Tensor
    student_embedding: Tensor
    labels: Tensor  # -1 where unlabeled
    teachers: tuple[TeacherView, ...]
    # With mixing (mixing.py): each image is own_share of the sample's own image and the rest of its partner's.
    partner_labels: Tensor | None = None
    own_share: Tensor | None = None

    def label_cross_entropy(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample: cross-entropy against the labels, weighted by how much of the image each labeled source
        makes up, and that labeled share (0 where no part has a label). Without mixing: CE where labeled, share 1/0."""
        share = (self.labels >= 0).float()
        loss = F.cross_entropy(logits.float(), self.labels.clamp_min(0), reduction="none") * share
        if self.partner_labels is None or self.own_share is None:
            return loss, share
        partner_share = (self.partner_labels >= 0).float() * (1.0 - self.own_share)
        share = share * self.own_share
        partner = F.cross_entropy(logits.float(), self.partner_labels.clamp_min(0), reduction="none")
        return loss * self.own_share + partner * partner_share, share + partner_share

    def main_labels(self) -> Tensor:
        """Each sample's label, or with mixing the label of the larger part of its image (-1: unlabeled)."""
        if self.partner_labels is None or self.own_share is None:
            return self.labels
        return torch.where(self.own_share >= 0.5, self.labels, self.partner_labels)


LOSSES: dict[str, type[DistillLoss]] = {}


def register(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    """Class decorator: make a loss usable as `--loss name=weight`."""

    def add(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.name = name
        LOSSES[name] = cls
        return cls

    return add


class DistillLoss:
    """Base: a per-sample loss against one teacher, averaged with the teachers' per-sample weights."""

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False  # teacher and student maps at the paired layers
    needs_hints: ClassVar[bool] = False  # the student's maps through the adapters (trainable, so only when used)
    needs_projector: ClassVar[bool] = False  # the student's embedding projected onto each teacher's (trainable)
    options: ClassVar[dict[str, float]] = {}  # tunable constants and their defaults (`--loss-option name.key=value`)

    def __init__(self, temperature: float = 4.0, **options: float):
        self.temperature = temperature
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(f"{self.name}.{key}" for key in self.options) or "none"
            raise EdgekdError(f"loss {self.name!r} has no option {', '.join(unknown)}; its options: {known}")
        for key, default in self.options.items():
            setattr(self, key, float(options.get(key, default)))

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = inputs.student_logits.new_zeros(())
        for view in inputs.teachers:
            total = total + (view.weight * self.per_sample(inputs, view)).mean()
        return total

    def per_sample(self, inputs: LossInputs, view: TeacherView) -> Tensor:
        raise NotImplementedError


class BatchLoss(DistillLoss):
    """A loss over the whole batch (relations between samples): each teacher counts by its mean weight."""

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = inputs.student_logits.new_zeros(())
        for view in inputs.teachers:
            total = total + view.weight.mean() * self.batch(inputs.student_embedding.float(), view.embedding.float())
        return total

    def batch(self, student: Tensor, teacher: Tensor) -> Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- response

@register("ce")
class CrossEntropy(DistillLoss):
    """Cross-entropy on the labels; samples without a label (-1) do not count. A mixed image counts each labeled
    part by its share (mixup's soft target)."""

    needs_labels = True

    def __call__(self, inputs: LossInputs) -> Tensor:
        loss, share = inputs.label_cross_entropy(inputs.student_logits)
        if not bool((share > 0).any()):
            return inputs.student_logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
        return loss.sum() / share.sum()


@register("kd")
class HintonKD(DistillLoss):
    """KL(teacher || student) on temperature-softened logits, scaled by T^2 so gradients keep their size.

    `standardize=1` z-scores each sample's logits first (Sun et al., "Logit Standardization in KD", CVPR 2024):
    the student then matches how the teacher ranks and spaces the classes, not the size of its logits, which a
    small student may not be able to reach. The paper pairs it with T=2, kd weight 9 and ce weight 0.1.

    `correct=1` corrects the teacher where its top class is not the label: the two logits swap places (Wen et
    al., "Preparing Lessons: Improve Knowledge Distillation with Better Supervision", 2019), so the target ranks
    the label first and keeps the rest of the teacher's ranking. With a small label weight (ce 0.1) the student
    would otherwise learn the teacher's mistakes on its training images. Unlabeled samples keep the teacher's
    answer; a mixed image is corrected towards the label of its larger part.
    """

    options = {"standardize": 0.0, "correct": 0.0}
    standardize: float
    correct: float

    def per_sample(self, inputs: LossInputs, view: TeacherView) -> Tensor:
        t = self.temperature
        student, teacher = inputs.student_logits.float(), view.logits.float()
        if self.correct:
            teacher = swap_top_with_label(teacher, inputs.main_labels())
        if self.standardize:
            student, teacher = _zscore(student), _zscore(teacher)
        log_student = F.log_softmax(student / t, dim=1)
        log_teacher = F.log_softmax(teacher / t, dim=1)
        return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1) * t * t


def swap_top_with_label(logits: Tensor, labels: Tensor) -> Tensor:
    """`logits` with each labeled row's largest logit and its label's logit swapped (rows the top class already
    names, and unlabeled rows (-1), unchanged)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    top = logits.argmax(dim=1)
    label = torch.where(labels >= 0, labels, top)
    swapped = logits.clone()
    swapped[rows, top] = logits[rows, label]
    swapped[rows, label] = logits[rows, top]
    return swapped


def _zscore(values: Tensor, dim: int = 1, eps: float = 1e-7) -> Tensor:
    """Standardised along `dim`: each sample's logits (dim 1), or each dimension over the batch (dim 0)."""
    return (values - values.mean(dim=dim, keepdim=True)) / (values.std(dim=dim, keepdim=True) + eps)


@register("wsl")
class WeightedSoftLabels(HintonKD):
    """Weighted soft labels (Zhou et al., ICLR 2021): Hinton KD, weighted per sample by how much the teacher
    knows there that the student does not: 1 - exp(-CE_student / CE_teacher) on the label (both detached).

    Where the teacher is wrong and the student right the weight falls towards 0, so the teacher's mistakes are
    transferred less; unlabeled samples keep weight 1 (plain KD). On mixed images both CEs are the mixed-label ones.
    """

    needs_labels = True

    def per_sample(self, inputs: LossInputs, view: TeacherView) -> Tensor:
        kd = super().per_sample(inputs, view)
        with torch.no_grad():
            ce_student, share = inputs.label_cross_entropy(inputs.student_logits)
            ce_teacher, _ = inputs.label_cross_entropy(view.logits)
            labeled = share > 0
            weight = 1.0 - torch.exp(-ce_student / ce_teacher.clamp_min(1e-7))
        return torch.where(labeled, weight, torch.ones_like(weight)) * kd


@register("dkd")
class DecoupledKD(DistillLoss):
    """Decoupled KD (Zhao et al., 2022): target-class KD + beta * non-target-class KD.

    The target is the label (of the larger part of a mixed image), or the teacher's top class for unlabeled
    samples. The paper's CIFAR-100 setting (alpha 1, beta 8) is the default; it suggests a smaller beta for
    ImageNet-like data (`--loss-option dkd.beta=0.5`).
    """

    options = {"alpha": 1.0, "beta": 8.0}
    alpha: float
    beta: float

    def per_sample(self, inputs: LossInputs, view: TeacherView) -> Tensor:
        t = self.temperature
        student, teacher = inputs.student_logits.float() / t, view.logits.float() / t
        labels = inputs.main_labels()
        target = torch.where(labels >= 0, labels, teacher.argmax(dim=1))
        gt = F.one_hot(target, student.shape[1]).bool()
        p_s, p_t = student.softmax(dim=1), teacher.softmax(dim=1)
        binary_s = torch.stack([p_s[gt], (p_s * ~gt).sum(dim=1)], dim=1).clamp_min(1e-8)
        binary_t = torch.stack([p_t[gt], (p_t * ~gt).sum(dim=1)], dim=1).clamp_min(1e-8)
        tckd = (binary_t * (binary_t.log() - binary_s.log())).sum(dim=1)
        log_other_s = F.log_softmax(student.masked_fill(gt, -1e4), dim=1)
        log_other_t = F.log_softmax(teacher.masked_fill(gt, -1e4), dim=1)
        nckd = (log_other_t.exp() * (log_other_t - log_other_s)).sum(dim=1)
        return (self.alpha * tckd + self.beta * nckd) * t * t


@register("dist")
class CorrelationKD(DistillLoss):
    """DIST (Huang et al., NeurIPS 2022): match how the teacher's softened probabilities correlate, not their values.

    inter: 1 - Pearson correlation of each sample's class probabilities (the teacher's ranking of the classes);
    intra: 1 - Pearson correlation of each class's probabilities across the batch (which samples look like it).
    Both are invariant to shifts and scales of the probabilities, so a small student is not asked to match a large
    teacher's confidence exactly. Scaled by T^2 like KD. The paper's weights are 1 and 1 (2 and 2 at T=4 on CIFAR).
    """

    options = {"inter": 1.0, "intra": 1.0}
    inter: float
    intra: float

    def __call__(self, inputs: LossInputs) -> Tensor:
        t = self.temperature
        total = inputs.student_logits.new_zeros(())
        p_s = (inputs.student_logits.float() / t).softmax(dim=1)
        for view in inputs.teachers:
            p_t = (view.logits.float() / t).softmax(dim=1)
            inter = 1.0 - _pearson(p_s, p_t, dim=1)  # (B,)
            intra = 1.0 - _pearson(p_s, p_t, dim=0)  # (K,): a relation over the batch counts by the mean share
            total = total + self.inter * (view.weight * inter).mean() + view.weight.mean() * self.intra * intra.mean()
        return total * t * t


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)


# ---------------------------------------------------------------------------------------------- feature

@register("fitnet")
class FitNetHint(DistillLoss):
    """FitNets hints: MSE between the adapted student maps and the teacher maps, averaged over the pairs.

    Teacher maps are standardised per sample, so pairs with large activations do not dominate the sum.
    """

    needs_features = True
    needs_hints = True

    def per_sample(self, inputs: LossInputs, view: TeacherView) -> Tensor:
        losses = [(hint.float() - _standardise(target.float())).pow(2).flatten(1).mean(dim=1)
                  for hint, target in zip(view.hints, view.features)]
        return torch.stack(losses).mean(dim=0)


@register("at")
class AttentionTransfer(DistillLoss):
    """Attention transfer (Zagoruyko & Komodakis): match where each map is active, whatever its channel count."""

    needs_features = True

    def per_sample(self, inputs: LossInputs, view: TeacherView) -> Tensor:
        losses = []
        for student, teacher in zip(view.student_features, view.features):
            size = min(student.shape[-2:], teacher.shape[-2:], key=lambda hw: hw[0] * hw[1])
            a_s, a_t = attention_map(student.float(), size), attention_map(teacher.float(), size)
            losses.append((a_s - a_t).pow(2).sum(dim=1))
        return torch.stack(losses).mean(dim=0)


@register("proj")
class ProjectedEmbedding(DistillLoss):
    """The student's pooled embedding, through a trained linear projector, matches the teacher's (Miles &
    Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024).

    Both sides are standardised per dimension over the batch (batch norm without learned scale), so the loss asks
    the student to carry the teacher's embedding up to a linear map, not its scale; smooth L1, as the paper. The
    embedding holds far more per image than the logits (hundreds of numbers against one per class), and it needs
    no maps: the teacher cache keeps it, so this runs on fixed views without the teacher.
    """

    needs_projector = True

    def per_sample(self, inputs: LossInputs, view: TeacherView) -> Tensor:
        if view.projected is None:
            raise EdgekdError("loss 'proj' needs the student's projector; it is built when the loss is configured")
        student, teacher = _batch_standardise(view.projected.float()), _batch_standardise(view.embedding.float())
        return F.smooth_l1_loss(student, teacher, reduction="none").mean(dim=1)


def _batch_standardise(embedding: Tensor) -> Tensor:
    """Each dimension z-scored over the batch, as batch norm does in training (a single sample becomes zeros)."""
    if len(embedding) < 2:
        return torch.zeros_like(embedding)
    return _zscore(embedding, dim=0, eps=1e-5)


def attention_map(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """Channel-pooled squared activation, resized to `size`, flattened and L2-normalised per sample."""
    attention = feature.pow(2).mean(dim=1, keepdim=True)
    if attention.shape[-2:] != tuple(size):
        attention = F.adaptive_avg_pool2d(attention, size)
    return F.normalize(attention.flatten(1), dim=1)


def _standardise(feature: Tensor) -> Tensor:
    return F.layer_norm(feature, feature.shape[1:])


# ---------------------------------------------------------------------------------------------- relation

@register("rkd")
class RelationalKD(BatchLoss):
    """RKD (Park et al., 2019): distance + angle relations of the pooled embeddings; invariant to their scale."""

    options = {"distance": 1.0, "angle": 2.0}  # the paper's 25:50 weights of distance and angle
    distance: float
    angle: float

    def batch(self, student: Tensor, teacher: Tensor) -> Tensor:
        distance = F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher))
        angle = F.smooth_l1_loss(_angles(student), _angles(teacher))
        return self.distance * distance + self.angle * angle


def _normalised_distances(embedding: Tensor) -> Tensor:
    distances = torch.cdist(embedding, embedding)
    off_diagonal = distances[~torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)]
    return distances / off_diagonal.mean().clamp_min(1e-8)


def _angles(embedding: Tensor) -> Tensor:
    differences = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


@register("sp")
class SimilarityPreserving(BatchLoss):
    """Similarity-preserving KD (Tung & Mori, 2019): match the row-normalised batch similarity matrices."""

    def batch(self, student: Tensor, teacher: Tensor) -> Tensor:
        g_s = F.normalize(student @ student.t(), dim=1)
        g_t = F.normalize(teacher @ teacher.t(), dim=1)
        return (g_s - g_t).pow(2).sum() / len(student) ** 2


# ---------------------------------------------------------------------------------------------- specs + schedule

@dataclass(frozen=True)
class LossSpec:
    """One `--loss name=weight` term; `name=start:end` ramps the weight linearly over training.

    `options` set the loss's constants (`--loss-option dkd.beta=2`), as sorted (key, value) pairs.
    """

    name: str
    start: float
    end: float
    options: tuple[tuple[str, float], ...] = ()

    def weight_at(self, progress: float) -> float:
        """The weight at `progress` in [0, 1] of training."""
        return self.start + (self.end - self.start) * min(1.0, max(0.0, progress))

    def __str__(self) -> str:
        options = f"({','.join(f'{k}={v:g}' for k, v in self.options)})" if self.options else ""
        return f"{self.name}={self.start:g}" + (f":{self.end:g}" if self.end != self.start else "") + options


def _terms(texts: list[str] | tuple[str, ...]) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [part.strip() for item in texts for part in item.split(",") if part.strip()]


def parse_loss_specs(texts: list[str] | tuple[str, ...],
                     option_texts: list[str] | tuple[str, ...] = ()) -> tuple[LossSpec, ...]:
    """Parse `name=weight` / `name=start:end` terms and `name.key=value` options of those terms."""
    specs = _parse_weights(texts)
    options = _parse_options(option_texts, {spec.name for spec in specs})
    specs = tuple(replace(spec, options=tuple(sorted(options.get(spec.name, {}).items()))) for spec in specs)
    for spec in specs:  # an unknown option fails here, before any data is read
        LOSSES[spec.name](**dict(spec.options))
    return specs


def _parse_options(texts: list[str] | tuple[str, ...], losses: set[str]) -> dict[str, dict[str, float]]:
    options: dict[str, dict[str, float]] = {}
    for text in _terms(texts):
        target, sep, value = text.partition("=")
        name, dot, key = target.strip().lower().partition(".")
        try:
            number = float(value) if sep and dot and key else None
        except ValueError:
            number = None
        if number is None:
            raise EdgekdError(f"bad --loss-option {text!r}; write LOSS.KEY=NUMBER, e.g. dkd.beta=2")
        if name not in losses:
            raise EdgekdError(f"--loss-option {text!r} is for loss {name!r}, which is not in --loss; "
                              f"add --loss {name}=WEIGHT")
        options.setdefault(name, {})[key] = number
    return options


def _parse_weights(texts: list[str] | tuple[str, ...]) -> tuple[LossSpec, ...]:
    specs: list[LossSpec] = []
    for text in _terms(texts):
        name, sep, weight = text.partition("=")
        name = name.strip().lower()
        if name not in LOSSES:
            raise EdgekdError(f"unknown loss {name!r} in --loss {text!r}; known losses: {', '.join(sorted(LOSSES))}")
        if any(spec.name == name for spec in specs):
            raise EdgekdError(f"loss {name!r} is given twice; give each --loss once")
        try:
            values = [float(v) for v in weight.split(":")] if sep else [1.0]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or any(v < 0 for v in values):
            raise EdgekdError(f"bad weight in --loss {text!r}; write name=WEIGHT or name=START:END "
                              "with non-negative numbers, e.g. kd=1 or ce=1:0.2")
        specs.append(LossSpec(name, values[0], values[-1]))
    return tuple(specs)


def default_loss_specs(labeled: bool, transfer: bool = False) -> tuple[LossSpec, ...]:
    """edgekd.recipe's default terms for a student from random (or, transfer, real) weights; ce only with labels."""
    recipe = default_for_start(transfer)
    return tuple(spec for spec in parse_loss_specs(recipe.losses, recipe.loss_options)
                 if labeled or spec.name != "ce")


class Objective:
    """The weighted sum of the configured losses; also returns each term's value for logging."""

    def __init__(self, specs: tuple[LossSpec, ...], temperature: float):
        self.temperature = temperature
        if not specs:
            raise EdgekdError("no loss terms given; pass e.g. --loss kd=1 (known: " + ", ".join(sorted(LOSSES)) + ")")
        self.specs = specs
        self.losses = {spec.name: LOSSES[spec.name](temperature=temperature, **dict(spec.options)) for spec in specs}

    @property
    def needs_features(self) -> bool:
        return any(loss.needs_features for loss in self.losses.values())

    @property
    def needs_hints(self) -> bool:
        return any(loss.needs_hints for loss in self.losses.values())

    @property
    def needs_projector(self) -> bool:
        return any(loss.needs_projector for loss in self.losses.values())

    def check_labels(self, labeled: bool) -> None:
        needing = [name for name, loss in self.losses.items() if loss.needs_labels]
        if needing and not labeled:
            raise EdgekdError(f"loss {', '.join(needing)} needs labels but the data has none; "
                              "drop it from --loss (label-free distillation uses kd, dkd, dist, fitnet, at, proj, rkd, "
                              "sp)")

    def __call__(self, inputs: LossInputs, progress: float) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total, each term's unweighted value, detached: summed on the device, read rarely)."""
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        for spec in self.specs:
            value = self.losses[spec.name](inputs)
            terms[spec.name] = value.detach()
            total = total + spec.weight_at(progress) * value
        return total, terms
