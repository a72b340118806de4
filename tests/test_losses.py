"""Each distillation loss on known inputs, the loss-spec parser and the weight schedule."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgekd.distill.losses import (LOSSES, LossInputs, LossSpec, Objective, TeacherView, default_loss_specs,
                                   parse_loss_specs)
from edgekd.distill.train import DistillConfig, _with_recipe_defaults
from edgekd.errors import EdgekdError
from edgekd.recipe import FIXED_VIEWS_MAX_EPOCHS, FROM_RANDOM, default_augment

BATCH, CLASSES = 16, 10


def make_inputs(student_logits, teacher_logits, *, labels=None, student_embedding=None, teacher_embedding=None,
                hints=(), teacher_maps=(), student_maps=(), extra_teachers=()) -> LossInputs:
    generator = torch.Generator().manual_seed(1)
    if student_embedding is None:
        student_embedding = torch.randn(BATCH, 8, generator=generator)
    if teacher_embedding is None:
        teacher_embedding = torch.randn(BATCH, 12, generator=generator)
    all_logits = [teacher_logits, *extra_teachers]
    views = tuple(TeacherView(logits=logits, embedding=teacher_embedding, features=tuple(teacher_maps),
                              student_features=tuple(student_maps), hints=tuple(hints),
                              weight=torch.full((BATCH,), 1.0 / len(all_logits))) for logits in all_logits)
    labels = labels if labels is not None else torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return LossInputs(student_logits, student_embedding, labels, views)


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_response_loss_is_zero_for_identical_logits_and_grows_with_disagreement(name, logits):
    loss = LOSSES[name](temperature=4.0)
    assert float(loss(make_inputs(logits, logits.clone()))) == pytest.approx(0.0, abs=1e-5)
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    small = float(loss(make_inputs(logits + 0.5 * noise, logits)))
    large = float(loss(make_inputs(logits + 3.0 * noise, logits)))
    assert 0 < small < large


def test_kd_is_scaled_by_temperature_squared(logits):
    teacher = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    inputs = make_inputs(logits, teacher)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits / 2, 1), torch.log_softmax(teacher / 2, 1),
                                    log_target=True, reduction="batchmean")
    assert float(LOSSES["kd"](temperature=2.0)(inputs)) == pytest.approx(4 * float(kl), rel=1e-5)


def test_standardized_kd_asks_for_the_teachers_ranking_and_spacing_not_its_scale(logits):
    """Logit standardization: a student whose logits are the teacher's scaled and shifted has nothing to learn;
    plain KD still pushes it to match the size. Another ordering of the classes is a loss for both."""
    teacher = logits
    student = 0.3 * teacher + 2.0
    plain, standardized = LOSSES["kd"](temperature=2.0), LOSSES["kd"](temperature=2.0, standardize=1.0)
    assert float(standardized(make_inputs(student, teacher))) == pytest.approx(0.0, abs=1e-5)
    assert float(plain(make_inputs(student, teacher))) > 0.1
    shuffled = teacher[:, torch.randperm(CLASSES, generator=torch.Generator().manual_seed(2))]
    assert float(standardized(make_inputs(shuffled, teacher))) > 0.1


def test_dist_asks_for_the_teachers_correlations_not_its_probabilities(logits):
    """DIST: a student whose probabilities are the teacher's blended with the uniform distribution (less confident,
    same ranking within each sample and across the batch) has nothing to learn, where KD still pushes it; another
    ordering of the classes is a loss; and the loss grows with the disagreement."""
    t = 2.0
    blend = 0.4 * torch.softmax(logits / t, dim=1) + 0.6 / CLASSES
    softer = torch.log(blend) * t
    dist, kd = LOSSES["dist"](temperature=t), LOSSES["kd"](temperature=t)
    assert float(dist(make_inputs(softer, logits))) == pytest.approx(0.0, abs=1e-5)
    assert float(kd(make_inputs(softer, logits))) > 0.05
    assert float(dist(make_inputs(logits.flip(1), logits))) > 0.5
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    assert 0 < float(dist(make_inputs(logits + 0.5 * noise, logits))) < float(dist(make_inputs(logits + 3 * noise,
                                                                                                  logits)))
    only_inter = LOSSES["dist"](temperature=t, intra=0.0)
    assert 0 < float(only_inter(make_inputs(logits + 3 * noise, logits))) < float(dist(make_inputs(logits + 3 * noise,
                                                                                                      logits)))


def test_kd_gradient_moves_student_towards_teacher(logits):
    teacher = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    student = logits.clone().requires_grad_(True)
    loss = LOSSES["kd"](temperature=1.0)
    before = float(loss(make_inputs(student, teacher)).detach())
    loss(make_inputs(student, teacher)).backward()
    with torch.no_grad():
        student -= 5.0 * student.grad
    assert float(loss(make_inputs(student, teacher)).detach()) < before


def test_cross_entropy_ignores_unlabeled_samples(logits):
    labels = torch.randint(0, CLASSES, (BATCH,), generator=torch.Generator().manual_seed(5))
    half = labels.clone()
    half[BATCH // 2:] = -1
    expected = torch.nn.functional.cross_entropy(logits[: BATCH // 2], labels[: BATCH // 2])
    assert float(LOSSES["ce"]()(make_inputs(logits, logits, labels=half))) == pytest.approx(float(expected), rel=1e-5)
    unlabeled = LOSSES["ce"]()(make_inputs(logits.requires_grad_(True), logits, labels=torch.full((BATCH,), -1)))
    assert float(unlabeled.detach()) == 0.0 and unlabeled.requires_grad


@pytest.mark.parametrize("name", ["rkd", "sp"])
def test_relation_losses_are_zero_for_the_same_embedding(name, logits):
    embedding = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(6))
    same = make_inputs(logits, logits, student_embedding=embedding, teacher_embedding=embedding.clone())
    other = make_inputs(logits, logits, student_embedding=embedding,
                        teacher_embedding=torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(7)))
    assert float(LOSSES[name]()(same)) == pytest.approx(0.0, abs=1e-6)
    assert float(LOSSES[name]()(other)) > 1e-3


def test_rkd_is_invariant_to_scaling_the_embeddings(logits):
    generator = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 32, generator=generator)
    rkd = LOSSES["rkd"]()
    base = float(rkd(make_inputs(logits, logits, student_embedding=student, teacher_embedding=teacher)))
    scaled = float(rkd(make_inputs(logits, logits, student_embedding=7.0 * student, teacher_embedding=0.1 * teacher)))
    assert base > 0
    assert scaled == pytest.approx(base, rel=1e-4)


def test_feature_losses_on_known_maps(logits):
    generator = torch.Generator().manual_seed(9)
    teacher_map = torch.randn(BATCH, 6, 4, 4, generator=generator)
    standardised = torch.nn.functional.layer_norm(teacher_map, teacher_map.shape[1:])
    fitnet = LOSSES["fitnet"]()
    assert float(fitnet(make_inputs(logits, logits, hints=[standardised], teacher_maps=[teacher_map]))) < 1e-10
    assert float(fitnet(make_inputs(logits, logits, hints=[torch.zeros_like(teacher_map)],
                                    teacher_maps=[teacher_map]))) == pytest.approx(1.0, rel=1e-3)
    # Attention transfer compares where maps are active, whatever their channels and (pooled) size.
    at = LOSSES["at"]()
    wider = teacher_map.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).repeat(1, 3, 1, 1)
    assert float(at(make_inputs(logits, logits, student_maps=[wider], teacher_maps=[teacher_map]))) < 1e-6
    shifted = teacher_map.roll(1, dims=2)
    assert float(at(make_inputs(logits, logits, student_maps=[shifted], teacher_maps=[teacher_map]))) > 1e-3


def test_confidence_weights_split_each_sample_between_teachers(logits):
    teacher_a, teacher_b = logits, torch.randn(logits.shape, generator=torch.Generator().manual_seed(10))
    kd = LOSSES["kd"]()
    both = make_inputs(logits, teacher_a, extra_teachers=[teacher_b])
    only_b = make_inputs(logits, teacher_b)
    # Teacher A equals the student (zero loss), so the mix is exactly half of teacher B's loss.
    assert float(kd(both)) == pytest.approx(0.5 * float(kd(only_b)), rel=1e-5)


def test_parse_loss_specs_and_schedule():
    specs = parse_loss_specs(["ce=1", "kd=0.5:2,fitnet"])
    assert specs == (LossSpec("ce", 1, 1), LossSpec("kd", 0.5, 2), LossSpec("fitnet", 1, 1))
    assert specs[1].weight_at(0.0) == 0.5 and specs[1].weight_at(0.5) == pytest.approx(1.25)
    assert specs[1].weight_at(1.0) == 2.0
    assert str(specs[1]) == "kd=0.5:2"


@pytest.mark.parametrize("text, message", [("kdd=1", "known losses: at, ce, dist, dkd, fitnet, kd, proj, rkd, sp, wsl"),
                                           ("kd=x", "bad weight"),
                                           ("kd=-1", "non-negative"), ("kd=1,kd=2", "twice")])
def test_parse_loss_specs_rejects_bad_input(text, message):
    with pytest.raises(EdgekdError, match=message):
        parse_loss_specs([text])


def test_weighted_soft_labels_transfer_less_where_the_teacher_is_wrong():
    labels = torch.tensor([0, 0, -1])
    student = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # wrong, right, unlabeled
    teacher = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [2.0, 0.0, 0.0]])  # right, wrong, -
    inputs = LossInputs(student, torch.randn(3, 4), labels,
                        (TeacherView(teacher, torch.randn(3, 4), (), (), (), torch.ones(3)),))
    kd, wsl = LOSSES["kd"](), LOSSES["wsl"]()
    plain, weighted = kd.per_sample(inputs, inputs.teachers[0]), wsl.per_sample(inputs, inputs.teachers[0])
    ratio = weighted / plain
    assert ratio[0] > 0.9  # the teacher knows better: (almost) all of its soft labels go through
    assert ratio[1] < 0.05  # the teacher is wrong where the student is right: (almost) nothing goes through
    assert float(ratio[2]) == pytest.approx(1.0)  # no label: plain KD
    same = LossInputs(teacher, torch.randn(3, 4), labels, inputs.teachers)
    assert float(wsl(same)) == pytest.approx(0.0, abs=1e-6)


def test_corrected_kd_teaches_the_label_first_where_the_teacher_is_wrong_and_keeps_the_rest_of_its_ranking():
    labels = torch.tensor([0, 0, -1])
    teacher = torch.tensor([[1.0, 4.0, 2.0], [5.0, 1.0, 0.0], [0.0, 3.0, 1.0]])  # wrong, right, unlabeled
    swapped = torch.tensor([[4.0, 1.0, 2.0], [5.0, 1.0, 0.0], [0.0, 3.0, 1.0]])  # only the wrong row changes
    inputs = LossInputs(teacher, torch.randn(3, 4), labels,
                        (TeacherView(teacher, torch.randn(3, 4), (), (), (), torch.ones(3)),))
    corrected = LOSSES["kd"](temperature=2.0, correct=1.0, standardize=1.0).per_sample(inputs, inputs.teachers[0])
    assert float(corrected[0]) > 0.5  # a student that copies the teacher's mistake is now off target
    assert corrected[1:].abs().max() < 1e-5  # right, or without a label: the teacher's answer stands
    on_target = LossInputs(swapped, torch.randn(3, 4), labels, inputs.teachers)
    assert float(LOSSES["kd"](correct=1.0)(on_target)) == pytest.approx(0.0, abs=1e-6)
    # a mixed image is corrected towards the label of its larger part
    mixed = replace(inputs, labels=torch.tensor([2, 0, -1]), partner_labels=torch.tensor([0, 1, -1]),
                    own_share=torch.tensor([0.3, 0.8, 1.0]))
    assert float(LOSSES["kd"](correct=1.0).per_sample(replace(mixed, student_logits=swapped), mixed.teachers[0])[0]) \
        == pytest.approx(0.0, abs=1e-6)


def test_loss_options_set_a_loss_constants(logits):
    teacher = torch.randn(logits.shape, generator=torch.Generator().manual_seed(12))
    inputs = make_inputs(logits, teacher, student_embedding=torch.randn(len(logits), 6),
                         teacher_embedding=torch.randn(len(logits), 9))
    specs = parse_loss_specs(["dkd=1,rkd=1"], ["dkd.beta=0,rkd.angle=0", "rkd.distance=3"])
    assert str(specs[0]) == "dkd=1(beta=0)" and str(specs[1]) == "rkd=1(angle=0,distance=3)"
    objective = Objective(specs, temperature=4.0)
    _, tuned = objective(inputs, progress=0.0)
    _, default = Objective(parse_loss_specs(["dkd=1,rkd=1"]), temperature=4.0)(inputs, progress=0.0)
    target_only = LOSSES["dkd"](beta=0.0)  # beta scales the non-target term, so 0 leaves the target-class term
    distance_only = LOSSES["rkd"](angle=0.0)
    assert float(tuned["dkd"]) == pytest.approx(float(target_only(inputs)))
    assert float(tuned["dkd"]) < float(default["dkd"])  # the non-target term (beta 8 by default) is gone
    assert float(tuned["rkd"]) == pytest.approx(3 * float(distance_only(inputs)))


@pytest.mark.parametrize("losses, options, message", [
    (["dkd=1"], ["dkd.gamma=2"], "no option gamma; its options: dkd.alpha, dkd.beta"),
    (["kd=1"], ["dkd.beta=2"], "not in --loss; add --loss dkd=WEIGHT"),
    (["dkd=1"], ["dkd.beta"], "write LOSS.KEY=NUMBER"),
    (["dkd=1"], ["beta=2"], "write LOSS.KEY=NUMBER"),
    (["dkd=1"], ["dkd.beta=high"], "write LOSS.KEY=NUMBER")])
def test_loss_options_reject_bad_input(losses, options, message):
    with pytest.raises(EdgekdError, match=message):
        parse_loss_specs(losses, options)


def test_objective_sums_weighted_terms_and_checks_labels(logits):
    teacher = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11))
    inputs = make_inputs(logits, teacher)
    objective = Objective(parse_loss_specs(["ce=1", "kd=0:2"]), temperature=4.0)
    total, terms = objective(inputs, progress=0.25)
    assert set(terms) == {"ce", "kd"}
    assert float(total) == pytest.approx(float(terms["ce"]) + 0.5 * float(terms["kd"]), rel=1e-5)
    with pytest.raises(EdgekdError, match="needs labels"):
        objective.check_labels(labeled=False)
    assert [s.name for s in default_loss_specs(labeled=False)] == ["kd"]
    # from random weights logit-standardized KD, from real weights plain KD (edgekd/recipe.py has the measurements)
    assert [str(s) for s in default_loss_specs(labeled=True)] == ["ce=0.1", "kd=9(standardize=1)"]
    assert [str(s) for s in default_loss_specs(labeled=True, transfer=True)] == ["ce=1", "kd=1"]


def test_default_views_are_fixed_only_for_short_schedules():
    """Fixed views won at 2-16 epochs and lost at 40 (edgekd/recipe.py)."""
    assert not default_augment(epochs=3) and not default_augment(FIXED_VIEWS_MAX_EPOCHS)
    assert default_augment(FIXED_VIEWS_MAX_EPOCHS + 1)


def test_default_rate_is_the_recipes_from_random_weights_only():
    """From random weights the student trains at edgekd.recipe's measured rate; from real weights at the transfer
    recipe's (train_utils.recipe_for, lr None); a rate given by name is kept either way."""
    assert _with_recipe_defaults(DistillConfig(), transfer=False).lr == FROM_RANDOM.lr == 8e-3
    assert _with_recipe_defaults(DistillConfig(), transfer=True).lr is None
    assert _with_recipe_defaults(DistillConfig(lr=1e-3), transfer=False).lr == 1e-3
    # mixed images added from random weights only (labeled or not: distill_few_labels.md measured them beside
    # unlabeled images); given by name, they are what was asked
    assert (_with_recipe_defaults(DistillConfig(), transfer=False).mix_extra, FROM_RANDOM.mix) == (0.5, "mixup")
    assert _with_recipe_defaults(DistillConfig(mix="none"), transfer=False).mix_extra == 0.0
    assert _with_recipe_defaults(DistillConfig(mix="cutmix", mix_extra=0.0), transfer=False).mix_extra == 0.0
    assert _with_recipe_defaults(DistillConfig(), transfer=True).mix == "none"
