"""Consistent teaching: mixup/cutmix of the shared view, identical for teacher and student, and the mixed-label
losses. The end-to-end check runs a real distillation and reads the tensors the real models received."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from edgekd.data import load_data
from edgekd.distill import DistillConfig, distill, parse_loss_specs
from edgekd.distill.losses import LOSSES
from edgekd.distill.mixing import mix_batch
from edgekd.distill.state import TEACHER_CACHE_ENV
from edgekd.distill.students import build_student
from edgekd.distill.train import DistillLoop
from edgekd.distill.teacher import prepare_teacher
from edgekd.errors import EdgekdError
from edgekd.models import preprocess_for
from edgekd.types import DataSpec, TeacherSpec, TrainConfig
from tests.test_losses import BATCH, CLASSES, make_inputs


def _images(size: int = 32) -> torch.Tensor:
    return torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_mixup_commutes_with_each_models_resize_and_normalisation():
    """The teacher's mixed tensor is its own preprocessing of the student's mixed image."""
    pixels = _images(64)
    student_in = (pixels - 0.5) / 0.25
    teacher_pre = lambda x: (F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True) - 0.4) / 0.3  # noqa: E731
    labels = torch.arange(BATCH) % CLASSES
    mixed = mix_batch((student_in, teacher_pre(pixels)), labels, "mixup", 1.0, seed=0, step=7)
    share = float(mixed.own_share[0])
    assert 0.0 < share < 1.0 and torch.all(mixed.own_share == share)
    mixed_pixels = mixed.inputs[0] * 0.25 + 0.5
    torch.testing.assert_close(mixed_pixels, pixels * share + pixels.flip(0) * (1 - share))
    torch.testing.assert_close(mixed.inputs[1], teacher_pre(mixed_pixels), rtol=1e-4, atol=1e-5)
    assert torch.equal(mixed.partner_labels, labels.flip(0))


def test_cutmix_pastes_the_same_region_at_every_input_size():
    small, large = _images(32), F.interpolate(_images(32), scale_factor=2, mode="nearest")
    for step in range(20):
        mixed = mix_batch((small, large), torch.arange(BATCH), "cutmix", 1.0, seed=1, step=step)
        pasted_small = (mixed.inputs[0] != small).any(dim=1)[0]  # pixels taken from the partner
        pasted_large = (mixed.inputs[1] != large).any(dim=1)[0]
        assert torch.equal(pasted_large, F.interpolate(pasted_small[None, None].float(), scale_factor=2)[0, 0].bool())
        assert float(mixed.own_share[0]) == pytest.approx(1 - float(pasted_small.float().mean()), abs=1e-6)


def test_a_step_mixes_the_same_way_every_time_and_steps_differ():
    """Resumed runs mix as uninterrupted ones do: the draw depends on (seed, step) only."""
    images, labels = _images(), torch.arange(BATCH) % CLASSES
    draws = [mix_batch((images,), labels, "mixup+cutmix", 1.0, seed=0, step=s) for s in (5, 5, 6)]
    assert torch.equal(draws[0].inputs[0], draws[1].inputs[0])
    assert not torch.equal(draws[0].inputs[0], draws[2].inputs[0])
    both = {("cutmix" if bool((mix_batch((images,), labels, "mixup+cutmix", 1.0, 0, s).inputs[0] == images)
                              .any()) else "mixup") for s in range(20)}
    assert both == {"mixup", "cutmix"}


def test_cross_entropy_on_a_mixed_image_weighs_each_labeled_part_by_its_share():
    logits = torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(BATCH) % CLASSES
    partner = labels.flip(0)
    share = torch.full((BATCH,), 0.7)
    inputs = replace(make_inputs(logits, logits, labels=labels), partner_labels=partner, own_share=share)
    expected = (0.7 * F.cross_entropy(logits, labels, reduction="none")
                + 0.3 * F.cross_entropy(logits, partner, reduction="none")).mean()
    assert float(LOSSES["ce"]()(inputs)) == pytest.approx(float(expected), rel=1e-5)
    # an unlabeled partner: only the labeled 70% of the image has a target
    half = partner.clone()
    half[: BATCH // 2] = -1
    inputs = replace(inputs, partner_labels=half)
    own = F.cross_entropy(logits, labels, reduction="none")
    other = F.cross_entropy(logits, partner, reduction="none")
    numerator = (0.7 * own).sum() + (0.3 * other[BATCH // 2:]).sum()
    assert float(LOSSES["ce"]()(inputs)) == pytest.approx(float(numerator / (0.7 * BATCH + 0.3 * BATCH / 2)), rel=1e-5)
    # dkd's target class is the label of the larger part
    assert torch.equal(inputs.main_labels(), labels)
    assert torch.equal(replace(inputs, own_share=torch.full((BATCH,), 0.2)).main_labels(), half)


def test_bad_mix_settings_are_refused():
    from edgekd.distill.mixing import check_mix

    with pytest.raises(EdgekdError, match="unknown --mix 'blend'; use one of none, mixup, cutmix, mixup\\+cutmix"):
        check_mix("blend", 1.0)
    with pytest.raises(EdgekdError, match="--mix-alpha must be positive"):
        check_mix("mixup", 0.0)
    with pytest.raises(EdgekdError, match="--mix-extra must be 0 or more"):
        check_mix("mixup", 1.0, -0.5)
    with pytest.raises(EdgekdError, match="--mix-extra adds mixed images, and --mix is none; give --mix mixup"):
        check_mix("none", 1.0, 0.5)
    check_mix(None, 1.0, None)  # both left to the recipe


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """96 training images and a test_resnet teacher (its mean/std 0.5; the test_efficientnet student's ImageNet's)."""
    data = load_data(DataSpec("fashion-mnist", max_train=96, max_val=32))
    teacher = prepare_teacher(TeacherSpec("test_resnet", random_init=True), data,
                              tmp_path_factory.mktemp("mixing") / "teacher", image_size=(32, 32),
                              train_config=TrainConfig(epochs=0.5, batch_size=32, num_workers=0))
    return data, teacher


def _stem_inputs(run: Callable[[], Any], count: int, sizes: tuple[int, ...] = (32,)) -> list[torch.Tensor]:
    """The first `count` batches of `sizes` images given to a stem (a convolution of the 3 colour channels) while
    `run` runs (smaller ones probe shapes and memory): in a step the teacher's forward passes come before the
    student's."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3 and len(args[0]) in sizes \
                and len(seen) < count:
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen


def _pixels(x: torch.Tensor, pre) -> torch.Tensor:
    return x * torch.tensor(pre.std).view(1, -1, 1, 1) + torch.tensor(pre.mean).view(1, -1, 1, 1)


STUDENT_PRE = preprocess_for(build_student("test_efficientnet", 10, (32, 32)), (32, 32))


@pytest.mark.slow
def test_teacher_and_student_receive_the_identical_mixed_tensor(small_run, tmp_path):
    """A real run: read the tensors the teacher's and the student's stems were given in the first training step.
    They hold the same pixels (each in its own model's normalisation), and the student's is the unmixed run's
    first batch mixed by (seed, step 0)."""
    data, teacher = small_run
    config = DistillConfig(epochs=0.34, batch_size=32, num_workers=0, losses=parse_loss_specs(["ce=1,kd=1"]),
                           augment=True, mix_extra=0.0)  # function matching: the crop/flip, then the mix, shared

    def first_step_inputs(mix: str) -> list[torch.Tensor]:
        return _stem_inputs(lambda: distill([teacher], "test_efficientnet", data, replace(config, mix=mix),
                                            tmp_path / mix), 2)

    assert STUDENT_PRE.mean != teacher.preprocess.mean
    teacher_plain, student_plain = first_step_inputs("none")
    torch.testing.assert_close(_pixels(teacher_plain, teacher.preprocess), _pixels(student_plain, STUDENT_PRE))
    teacher_mixed, student_mixed = first_step_inputs("mixup")
    torch.testing.assert_close(_pixels(teacher_mixed, teacher.preprocess), _pixels(student_mixed, STUDENT_PRE))
    expected = mix_batch((student_plain,), torch.zeros(32, dtype=torch.long), "mixup", config.mix_alpha,
                         config.seed, 0).inputs[0]
    torch.testing.assert_close(student_mixed, expected)
    assert not torch.allclose(student_mixed, student_plain)


@pytest.mark.slow
def test_mixed_images_added_to_the_batch_are_answered_live_beside_its_cached_images(small_run, tmp_path, monkeypatch):
    """--mix-extra 0.5 on fixed views, read from a real run's steps: each batch is the unmixed run's 32 images, then
    the first 16 of their mixed views (by (seed, step)), the same mix of the teacher's own views in its tensor; the
    teacher answers the 16 live at every step and reads the 32 from its cache, which the unmixed run filled: it
    keys the images as they are, the same with or without mixed images beside them."""
    monkeypatch.setenv(TEACHER_CACHE_ENV, str(tmp_path / "cache"))
    data, teacher = small_run
    config = DistillConfig(epochs=2, batch_size=32, num_workers=0, losses=parse_loss_specs(["ce=1,kd=1"]),
                           augment=False, cache_teacher=True, mix="none")
    events: list[tuple[str, Any]] = []  # ("step", the batch as trained) and ("teacher", what it answered), in order
    step, forward = DistillLoop.step, DistillLoop._teacher_forward
    monkeypatch.setattr(DistillLoop, "step", lambda self, batch, *rest: (events.append(("step", batch)),
                                                                         step(self, batch, *rest))[1])
    monkeypatch.setattr(DistillLoop, "_teacher_forward", lambda self, inputs: (
        events.append(("teacher", inputs[0].clone())), forward(self, inputs))[1])

    def steps(name: str, **changes) -> list[tuple[tuple, torch.Tensor]]:
        """Each step's batch and the images the teacher answered during it."""
        events.clear()
        distill([teacher], "test_efficientnet", data, replace(config, **changes), tmp_path / name)
        out = []
        for kind, value in events:
            if kind == "step":
                out.append((value, []))
            elif out:
                out[-1][1].append(value)
        return [(batch, torch.cat(answered) if answered else torch.empty(0)) for batch, answered in out]

    plain = steps("plain")
    extra = steps("extra", mix="mixup", mix_extra=0.5)
    assert len(extra) == len(plain) == 6  # 96 images, batches of 32, 2 epochs
    for index, ((batch, answered), (plain_batch, _)) in enumerate(zip(extra, plain)):
        student, teacher_in = batch[0], batch[1]
        assert len(student) == 48 and torch.equal(student[:32], plain_batch[0])
        assert torch.equal(teacher_in[:32], plain_batch[1])  # each model's own view of the image, as without mixing
        mixed = mix_batch(plain_batch[:2], plain_batch[2], "mixup", config.mix_alpha, config.seed, index)
        torch.testing.assert_close(student[32:], mixed.inputs[0][:16])  # the same pairs and ratio for both models
        torch.testing.assert_close(teacher_in[32:], mixed.inputs[1][:16])
        torch.testing.assert_close(answered, teacher_in[32:])  # the images as they are: the plain run's answers
    log = json.loads((tmp_path / "extra" / "distill_log.json").read_text())
    assert (log["mix"], log["mix_extra"], log["teacher_cache"]) == ("mixup", 0.5, True)
    assert log["teacher_cache_misses"] == 0 and log["teacher_cache_hits"] == 2 * len(data.train)
    # img/s counts the data's 96 images per epoch, not the 48 mixed ones added to them
    assert [round(e["images_per_s"] * e["seconds"]) for e in log["epoch_log"]] == [len(data.train)] * 2


def test_the_report_says_how_the_shared_views_were_mixed():
    from edgekd.evaluate.report import distill_line

    setup = {"losses": ["ce=1", "kd=1"], "temperature": 4.0, "compute": "cpu, fp32", "teacher_compute": "cpu, fp32",
             "epochs": [{}], "seconds": 3.0}
    assert "losses ce=1, kd=1 at T=4; student on cpu" in distill_line({**setup, "mix": "none"})
    assert "losses ce=1, kd=1 at T=4, cutmix (alpha 0.5) on views shared with the teacher; student" in \
        distill_line({**setup, "mix": "cutmix", "mix_alpha": 0.5})
    assert "losses ce=0.1, kd=9 at T=4, mixup (alpha 1) added to each batch (0.5 per image) on views shared" in \
        distill_line({**setup, "losses": ["ce=0.1", "kd=9"], "mix": "mixup", "mix_extra": 0.5})
