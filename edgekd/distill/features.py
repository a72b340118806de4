"""Feature taps and adapters: intermediate maps out of any model, and a student's maps shaped like a teacher's.

timm models give their stage ends through `feature_info` and their maps through `forward_intermediates` (no
hooks). Other models are tapped with forward hooks on their top-level children. Pairs are chosen by relative
depth, and an adapter per pair turns tokens into maps, projects channels (1x1 conv) and resizes space, so any
teacher/student pair works: CNN to CNN, ViT to CNN, CNN to ViT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.errors import EdgekdError

DEFAULT_PAIRS = 3


@dataclass(frozen=True)
class Tap:
    """A place features can be taken from: a stage end of the model."""

    name: str  # the module's name (timm feature_info "module", or a top-level child)
    index: int  # position among the model's taps (its forward_intermediates index)
    count: int  # how many taps the model has (for relative depth)

    @property
    def depth(self) -> float:
        return (self.index + 1) / self.count


def uses_intermediates(model: nn.Module) -> bool:
    return all(hasattr(model, attr) for attr in ("forward_intermediates", "feature_info", "forward_head"))


def list_taps(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[Tap, ...]:
    """The model's stage ends: timm's feature_info, or (other models) the children where the map shape changes."""
    if uses_intermediates(model):
        names = [info["module"] for info in model.feature_info]
    else:
        names = _hooked_stage_ends(model, input_size)
    return tuple(Tap(name, i, len(names)) for i, name in enumerate(names))


def _hooked_stage_ends(model: nn.Module, input_size: tuple[int, int, int]) -> list[str]:
    """Top-level children that output maps or tokens (not the head); of a run of same-shaped outputs, the last."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [child.register_forward_hook(_recorder(shapes, name, shape_only=True))
               for name, child in model.named_children() if not isinstance(child, _HEAD_MODULES)]
    try:
        _probe(model, lambda x: model(x), input_size)
    finally:
        for handle in handles:
            handle.remove()
    spatial = [(name, shape) for name, shape in shapes.items() if len(shape) in (3, 4)]
    ends = [name for i, (name, shape) in enumerate(spatial) if i + 1 == len(spatial) or spatial[i + 1][1] != shape]
    if not ends:
        raise EdgekdError(f"{type(model).__name__} has no child module that outputs feature maps; "
                          "use a timm model or drop the feature losses (fitnet, at) from --loss")
    return ends


_HEAD_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Linear)


def _recorder(store: dict, name: str, shape_only: bool = False):
    def hook(module: nn.Module, args, output) -> None:
        output = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(output, Tensor):
            store[name] = tuple(output.shape) if shape_only else output
    return hook


def _probe(model: nn.Module, run, input_size: tuple[int, int, int]):
    """Run once on a blank batch in eval mode (BatchNorm cannot train on it), restoring the mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            return run(torch.zeros(2, *input_size, device=parameter.device))
    finally:
        model.train(was_training)


def pair_layers(student: Sequence[Tap], teacher: Sequence[Tap], *, count: int = DEFAULT_PAIRS,
                named: Sequence[tuple[str, str]] | None = None) -> tuple[tuple[Tap, Tap], ...]:
    """Which student tap learns from which teacher tap.

    Named pairs are checked against the taps that exist. Otherwise the student's deepest `count` stage ends
    (after its stem) each take the teacher tap at the closest relative depth, one student tap per teacher tap.
    """
    if named:
        return tuple((_find(student, s, "student"), _find(teacher, t, "teacher")) for s, t in named)
    candidates = list(student[1:] if len(student) > 1 else student)[-count:]
    best: dict[str, tuple[float, Tap, Tap]] = {}
    for s in candidates:
        t = min(teacher, key=lambda tap: abs(tap.depth - s.depth))
        gap = abs(t.depth - s.depth)
        if t.name not in best or gap < best[t.name][0]:
            best[t.name] = (gap, s, t)
    return tuple(sorted(((s, t) for _, s, t in best.values()), key=lambda pair: pair[0].index))


def _find(taps: Sequence[Tap], name: str, role: str) -> Tap:
    for tap in taps:
        if tap.name == name:
            return tap
    raise EdgekdError(f"the {role} has no feature layer {name!r}; available: {', '.join(t.name for t in taps)}")


def parse_feature_pairs(text: str | None) -> tuple[tuple[str, str], ...] | None:
    """`student_layer:teacher_layer,...` (e.g. `layer3:blocks.9,layer4:blocks.11`) -> pairs; empty -> automatic."""
    if not text or not text.strip():
        return None
    pairs = []
    for item in text.split(","):
        student, sep, teacher = item.strip().partition(":")
        if not sep or not student or not teacher:
            raise EdgekdError(f"bad --feature-pairs item {item.strip()!r}; write STUDENT_LAYER:TEACHER_LAYER, "
                              "comma-separated, e.g. layer3:blocks.9")
        pairs.append((student.strip(), teacher.strip()))
    return tuple(pairs)


# ---------------------------------------------------------------------------------------------- tapped models

class TappedModel(nn.Module):
    """One forward pass -> (logits, pooled embedding, maps at the chosen taps), for timm and other models."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap]):
        super().__init__()
        self.model = model
        self.taps = tuple(taps)
        self.timm = uses_intermediates(model)
        self._store: dict[str, Tensor] = {}
        if not self.timm:
            modules = dict(model.named_modules())
            for tap in self.taps:
                modules[tap.name].register_forward_hook(_recorder(self._store, tap.name))
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if linears:  # the classifier's input is the embedding
                linears[-1].register_forward_pre_hook(lambda module, args: self._store.__setitem__("_embed", args[0]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        if self.timm:
            if self.taps:
                final, maps = self.model.forward_intermediates(x, indices=[tap.index for tap in self.taps])
            else:
                final, maps = self.model.forward_features(x), []
            return self.model.forward_head(final), self.model.forward_head(final, pre_logits=True), tuple(maps)
        self._store.clear()
        logits = self.model(x)
        maps = tuple(to_map(self._store[tap.name]) for tap in self.taps)
        embedding = self._store.get("_embed")
        if embedding is None:
            embedding = to_map(maps[-1]).mean(dim=(2, 3)) if maps else logits
        return logits, embedding.flatten(1), maps


def feature_shapes(model: TappedModel, input_size: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(C, H, W) of each tapped map at this input size."""
    maps = _probe(model, lambda x: model(x)[2], input_size)
    return tuple(tuple(to_map(m).shape[1:]) for m in maps)


def embedding_width(model: TappedModel, input_size: tuple[int, int, int]) -> int:
    """The width of the model's pooled embedding (the classifier's input)."""
    return int(_probe(model, lambda x: model(x)[1], input_size).shape[1])


def to_map(feature: Tensor) -> Tensor:
    """(B, C, H, W) from maps, tokens (B, N, C; prefix tokens such as [CLS] dropped) or vectors (B, C)."""
    if feature.ndim == 4:
        return feature
    if feature.ndim == 2:
        return feature[:, :, None, None]
    if feature.ndim == 3:
        tokens = feature.shape[1]
        for prefix in range(0, min(tokens, 9)):
            side = math.isqrt(tokens - prefix)
            if side > 0 and side * side == tokens - prefix:
                grid = feature[:, prefix:, :]
                return grid.transpose(1, 2).reshape(feature.shape[0], feature.shape[2], side, side)
    raise EdgekdError(f"cannot read a feature of shape {tuple(feature.shape)} as a map; "
                      "name other layers with --feature-pairs")


def resize(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool when shrinking (keeps every location's signal), bilinear when growing."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


class HintAdapter(nn.Module):
    """Student map -> the teacher map's shape: tokens to a map, 1x1 channel projection, spatial resize."""

    def __init__(self, student_channels: int, teacher_shape: tuple[int, int, int]):
        super().__init__()
        self.project = nn.Conv2d(student_channels, teacher_shape[0], kernel_size=1)
        self.size = (teacher_shape[1], teacher_shape[2])

    def forward(self, feature: Tensor) -> Tensor:
        return resize(self.project(to_map(feature)), self.size)


class HintedStudent(nn.Module):
    """The student, its taps and one adapter per (teacher, pair): the one module the optimizer and DDP see.

    forward(x) -> (logits, embedding, per teacher: the student's raw maps of its pairs, the adapted maps, the
    embedding projected to the teacher's width or None).
    Adapters exist only with `adapt` (a loss uses them): DDP needs every parameter to get a gradient.
    """

    def __init__(self, student: nn.Module, pairs: Sequence[Sequence[tuple[Tap, Tap]]],
                 teacher_shapes: Sequence[Sequence[tuple[int, int, int]]], input_size: tuple[int, int, int],
                 adapt: bool = True, embedding_widths: Sequence[int] = ()):
        super().__init__()
        taps = sorted({s for teacher_pairs in pairs for s, _ in teacher_pairs}, key=lambda tap: tap.index)
        self.tapped = TappedModel(student, taps)
        self.slots = tuple(tuple(taps.index(s) for s, _ in teacher_pairs) for teacher_pairs in pairs)
        student_shapes = feature_shapes(self.tapped, input_size) if taps else ()
        self.adapters = nn.ModuleList(
            nn.ModuleList(HintAdapter(student_shapes[slot][0], shape) for slot, shape in zip(slots, shapes) if adapt)
            for slots, shapes in zip(self.slots, teacher_shapes))
        # One linear map per teacher from the student's pooled embedding to that teacher's (only when a loss uses
        # it): a training-time head, like the adapters, left out of the exported student.
        width = embedding_width(self.tapped, input_size) if embedding_widths else 0
        self.projectors = nn.ModuleList(nn.Linear(width, teacher_width, bias=False)
                                        for teacher_width in embedding_widths)

    @property
    def heads(self) -> nn.ModuleList:
        """The training-time modules beside the student (adapters, projectors) that the optimizer trains too."""
        return nn.ModuleList([self.adapters, self.projectors])

    @property
    def student(self) -> nn.Module:
        return self.tapped.model

    def forward(self, x: Tensor):
        logits, embedding, maps = self.tapped(x)
        raw = tuple(tuple(maps[slot] for slot in slots) for slots in self.slots)
        hints = tuple(tuple(adapter(m) for adapter, m in zip(adapters, teacher_maps))
                      for adapters, teacher_maps in zip(self.adapters, raw))
        projected = tuple(projector(embedding.flatten(1)) for projector in self.projectors) or (None,) * len(raw)
        return logits, embedding, raw, hints, projected
