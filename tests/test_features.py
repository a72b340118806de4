"""Feature taps (timm forward_intermediates and the hook fallback), layer pairing and the hint adapters."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from edgekd.data import ModelInputs, load_data
from edgekd.distill.features import (HintedStudent, TappedModel, embedding_width, feature_shapes, list_taps,
                                     pair_layers, parse_feature_pairs, to_map)
from edgekd.distill.losses import LOSSES, LossInputs, TeacherView
from edgekd.errors import EdgekdError
from edgekd.models import preprocess_for
from edgekd.types import DataSpec

SIZE = (3, 32, 32)


def timm_model(name: str) -> torch.nn.Module:
    kwargs = {"img_size": 32} if "vit" in name else {}
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """A batch of real Fashion-MNIST images, preprocessed for each model used here."""
    data = load_data(DataSpec("fashion-mnist", max_train=40, max_val=10))
    out = {}
    for name in ("test_resnet", "test_vit"):
        pre = preprocess_for(timm_model(name), (32, 32))
        out[name] = torch.stack([ModelInputs(data.train, [pre], training=False)[i][0] for i in range(32)])
    return out


def test_timm_taps_are_the_stage_ends_of_feature_info():
    taps = list_taps(timm_model("test_resnet"), SIZE)
    assert [t.name for t in taps] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert [t.depth for t in taps] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_hook_fallback_finds_stage_ends_of_a_non_timm_model(images):
    model = torchvision.models.resnet18(num_classes=10).eval()
    taps = list_taps(model, SIZE)
    assert [t.name for t in taps] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    tapped = TappedModel(model, taps[-2:])
    logits, embedding, maps = tapped(images["test_resnet"])
    torch.testing.assert_close(logits, model(images["test_resnet"]))
    assert embedding.shape == (32, 512)
    assert [tuple(m.shape[1:]) for m in maps] == [(256, 2, 2), (512, 1, 1)]


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_tapped_timm_model_gives_the_same_logits_as_forward(name, images):
    model = timm_model(name)
    taps = list_taps(model, SIZE)
    logits, embedding, maps = TappedModel(model, taps[-2:])(images[name])
    torch.testing.assert_close(logits, model(images[name]))
    assert embedding.shape == (32, model.num_features)
    assert all(m.ndim == 4 for m in maps)  # ViT tokens come back as maps


def test_auto_pairs_match_by_relative_depth_and_named_pairs_are_checked():
    student, teacher = list_taps(timm_model("test_resnet"), SIZE), list_taps(timm_model("test_vit"), SIZE)
    pairs = pair_layers(student, teacher, count=3)
    assert [(s.name, t.name) for s, t in pairs] == [("layer2", "blocks.3"), ("layer3", "blocks.4"),
                                                      ("layer4", "blocks.5")]
    named = pair_layers(student, teacher, named=parse_feature_pairs("layer3:blocks.1"))
    assert [(s.name, t.name) for s, t in named] == [("layer3", "blocks.1")]
    with pytest.raises(EdgekdError, match="teacher has no feature layer 'blocks.9'; available: blocks.0, blocks.1"):
        pair_layers(student, teacher, named=[("layer3", "blocks.9")])
    with pytest.raises(EdgekdError, match="STUDENT_LAYER:TEACHER_LAYER"):
        parse_feature_pairs("layer3")


def test_tokens_become_maps_without_the_class_token():
    grid = torch.arange(2 * 9 * 4, dtype=torch.float32).reshape(2, 9, 4)
    tokens = torch.cat([torch.full((2, 1, 4), -1.0), grid], dim=1)  # [CLS] + a 3x3 grid
    as_map = to_map(tokens)
    assert as_map.shape == (2, 4, 3, 3)
    torch.testing.assert_close(as_map[:, :, 1, 2], grid[:, 5, :])


@pytest.mark.parametrize("student_name, teacher_name", [("test_resnet", "test_vit"), ("test_vit", "test_resnet")])
def test_adapters_shape_student_maps_like_the_teachers_and_learn(student_name, teacher_name, images):
    """ViT to CNN and CNN to ViT: adapted student maps take the teacher's shape, and FitNets training fits them."""
    teacher, student = timm_model(teacher_name), timm_model(student_name)
    pairs = pair_layers(list_taps(student, SIZE), list_taps(teacher, SIZE))
    tapped_teacher = TappedModel(teacher, [t for _, t in pairs])
    shapes = feature_shapes(tapped_teacher, SIZE)
    hinted = HintedStudent(student, [pairs], [shapes], SIZE)
    with torch.no_grad():
        teacher_logits, teacher_embedding, teacher_maps = tapped_teacher(images[teacher_name])

    def view(raw, hints, projected) -> TeacherView:
        assert [tuple(h.shape[1:]) for h in hints[0]] == list(shapes)
        return TeacherView(teacher_logits, teacher_embedding, teacher_maps, raw[0], hints[0], torch.ones(32))

    losses = train_steps(hinted, images[student_name], LOSSES["fitnet"](), view)
    assert losses[-1] < 0.9 * losses[0]


def train_steps(hinted: HintedStudent, images: torch.Tensor, loss, view, steps: int = 15) -> list[float]:
    """`steps` Adam steps of the student and its training-time heads on one loss; the loss after each.
    `view(raw maps, hints, projected embeddings)` builds the teacher's side of the loss from the student's outputs."""
    optimizer = torch.optim.Adam(hinted.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        logits, embedding, raw, hints, projected = hinted(images)
        value = loss(LossInputs(logits, embedding, torch.full((len(images),), -1), (view(raw, hints, projected),)))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    return losses


@pytest.mark.parametrize("student_name, teacher_name", [("test_resnet", "test_vit"), ("test_vit", "test_resnet")])
def test_projector_maps_the_student_embedding_onto_the_teachers_and_learns(student_name, teacher_name, images):
    """The 'proj' loss: a linear projector per teacher, from the student's pooled width to the teacher's; training
    the student and its projector brings the projected embedding towards the teacher's."""
    teacher, student = timm_model(teacher_name), timm_model(student_name)
    tapped_teacher = TappedModel(teacher, ())
    width = embedding_width(tapped_teacher, SIZE)
    hinted = HintedStudent(student, [[]], [[]], SIZE, embedding_widths=[width])
    assert hinted.projectors[0].in_features == embedding_width(TappedModel(student, ()), SIZE)
    with torch.no_grad():
        teacher_logits, teacher_embedding, _ = tapped_teacher(images[teacher_name])
    assert teacher_embedding.shape[1] == width

    def view(raw, hints, projected) -> TeacherView:
        assert projected[0].shape == teacher_embedding.shape
        return TeacherView(teacher_logits, teacher_embedding, (), raw[0], hints[0], torch.ones(32), projected[0])

    losses = train_steps(hinted, images[student_name], LOSSES["proj"](), view)
    assert losses[-1] < 0.9 * losses[0]
    assert not any(name.startswith("projectors") for name in hinted.student.state_dict())
