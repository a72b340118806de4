"""Teachers: names, real weights arriving intact, fine-tuning to the data's classes, bad checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgekd.errors import EdgekdError
from edgekd.models import create_model, resolve_model_name
from edgekd.distill.teacher import build_teacher, load_teacher_model, prepare_teacher
from edgekd.types import DataSpec, TeacherSpec, TrainConfig
from tests.helpers.efficientnet_lite0 import ARCHITECTURE, convert_to_timm, source_state_dict

QUICK = TrainConfig(epochs=1, batch_size=32, lr=3e-3, num_workers=0)


def test_aliases_and_timm_names_resolve():
    assert resolve_model_name("vit_base") == "vit_base_patch16_224"
    assert resolve_model_name("resnet50") == "resnet50"
    assert resolve_model_name("convnext_tiny.fb_in22k") == "convnext_tiny.fb_in22k"


def test_unknown_model_suggests_the_closest_names():
    with pytest.raises(EdgekdError, match="closest: resnet18"):
        resolve_model_name("resnt18")


def test_random_teacher_is_fine_tuned_and_measured(small_fmnist, tmp_path: Path):
    spec = TeacherSpec("test_resnet", random_init=True)
    result = prepare_teacher(spec, small_fmnist, tmp_path, image_size=(32, 32), train_config=QUICK)
    assert result.fine_tuned and result.weights_source == "random"
    assert result.preprocess.input_size == (3, 32, 32) and result.num_classes == 10
    assert result.val_top1 is not None and result.val_top1 > 0.25  # 10 classes: chance is 0.10
    assert len(result.history) == 1
    reloaded = load_teacher_model(result)
    assert sum(p.numel() for p in reloaded.parameters()) == result.params

    stamp = os.stat(result.weights_path).st_mtime_ns
    again = prepare_teacher(spec, small_fmnist, tmp_path, image_size=(32, 32), train_config=QUICK)
    assert again == result and os.stat(result.weights_path).st_mtime_ns == stamp  # reused, not retrained


def test_pretrained_weights_arrive_intact(tmp_path: Path):
    """The real ImageNet weights of efficientnet-lite0, loaded through --teacher-checkpoint, give the same outputs."""
    checkpoint = convert_to_timm(tmp_path / "lite0.safetensors")
    teacher, source, fresh_head = build_teacher(TeacherSpec(ARCHITECTURE, checkpoint=checkpoint), 1000, (64, 64))
    assert source.startswith("checkpoint:") and not fresh_head
    reference = create_model(ARCHITECTURE, 1000)
    reference.load_state_dict(dict(zip(reference.state_dict(), source_state_dict().values())))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(teacher.eval()(x), reference.eval()(x))


def test_pretrained_teacher_fine_tunes_better_than_random(small_fmnist, tmp_path: Path):
    """Same steps, same data: ImageNet weights must beat random init, proving the weights are real and used."""
    checkpoint = convert_to_timm(tmp_path / "lite0.safetensors")
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-3, num_workers=0)
    pretrained = prepare_teacher(TeacherSpec(ARCHITECTURE, checkpoint=checkpoint), small_fmnist, tmp_path / "pre",
                                 image_size=(64, 64), train_config=config)
    scratch = prepare_teacher(TeacherSpec(ARCHITECTURE, random_init=True), small_fmnist, tmp_path / "scratch",
                              image_size=(64, 64), train_config=config)
    assert pretrained.fine_tuned and pretrained.num_classes == 10  # the 1000-class head was replaced
    assert pretrained.val_top1 > scratch.val_top1 + 0.10, (pretrained.val_top1, scratch.val_top1)


def test_checkpoint_for_another_architecture_names_the_differences(tmp_path: Path):
    path = tmp_path / "vit.safetensors"
    save_file(create_model("test_vit", 10, (32, 32)).state_dict(), str(path))
    with pytest.raises(EdgekdError, match=r"does not fit .*(missing|unexpected|differ)"):
        build_teacher(TeacherSpec("test_resnet", checkpoint=path), 10, (32, 32))


def test_checkpoint_with_a_changed_layer_lists_the_shape(tmp_path: Path):
    state = create_model("test_resnet", 10).state_dict()
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(EdgekdError, match=r"conv1\.0\.weight \(3, 3, 3, 3\) vs"):
        build_teacher(TeacherSpec("test_resnet", checkpoint=tmp_path / "bad.pth"), 10, None)


def test_unreadable_checkpoint_is_rejected(tmp_path: Path):
    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(EdgekdError, match="cannot read checkpoint"):
        build_teacher(TeacherSpec("test_resnet", checkpoint=tmp_path / "junk.pth"), 10, None)


def test_offline_pretrained_request_names_the_checkpoint_option(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(EdgekdError, match="--teacher-checkpoint"):
        build_teacher(TeacherSpec("resnet18"), 10, (32, 32))


def test_unlabeled_data_cannot_fit_a_fresh_head(tmp_path: Path, fmnist_arrays):
    from edgekd.data import load_data
    from tests.helpers.images import write_images

    write_images(tmp_path / "loose", fmnist_arrays[0][:10], None)
    data = load_data(DataSpec(str(tmp_path / "loose")))
    with pytest.raises(EdgekdError, match="no labels"):
        prepare_teacher(TeacherSpec("test_resnet", random_init=True), data, tmp_path / "t", image_size=(32, 32),
                        train_config=QUICK)
    # a checkpoint with its own head (saved through a wrapper): the outline takes the head's classes from it
    from edgekd.distill.teacher import outline_teacher

    torch.save({"state_dict": {f"model.{k}": v for k, v in create_model("test_resnet", 7).state_dict().items()}},
               tmp_path / "own.ckpt")
    outline = outline_teacher(TeacherSpec("test_resnet", checkpoint=tmp_path / "own.ckpt"), data, (32, 32))
    assert (outline.num_classes, outline.image_size) == (7, (32, 32))


def test_an_interrupted_fine_tune_resumes_mid_epoch_and_ends_where_an_uninterrupted_one_does(small_fmnist, tmp_path):
    """A teacher's epoch can take an hour on a laptop: Ctrl-C keeps the batches done, and the re-run continues from
    the next batch (not the epoch's start), with the batches an uninterrupted run draws."""
    from edgekd.data import LoadedData
    from edgekd.distill.finetune import train_classifier
    from edgekd.models import preprocess_for
    from tests.helpers.interrupt import InterruptAfter

    config = TrainConfig(epochs=2, batch_size=64, num_workers=0, seed=3)  # 9 batches an epoch
    pre = preprocess_for(create_model("test_resnet", 10), (32, 32))

    def model():
        torch.manual_seed(0)
        return create_model("test_resnet", 10, (32, 32))

    straight, _ = train_classifier(model(), small_fmnist, pre, config, tmp_path / "straight")
    cut = LoadedData(small_fmnist.info, InterruptAfter(small_fmnist.train, 64 * 12 + 10), small_fmnist.val)
    with pytest.raises(KeyboardInterrupt):  # epoch 2, its 4th batch
        train_classifier(model(), cut, pre, config, tmp_path / "resumed")
    saved = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert saved["step"] == 12  # the 3 batches of epoch 2 that finished are kept
    resumed, history = train_classifier(model(), small_fmnist, pre, config, tmp_path / "resumed")
    assert [h["epoch"] for h in history] == [1, 2]
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # a Ctrl-C during an epoch's validation keeps every batch of it: the re-run only validates, then goes on
    in_validation = LoadedData(small_fmnist.info, small_fmnist.train, InterruptAfter(small_fmnist.val, 5))
    with pytest.raises(KeyboardInterrupt):
        train_classifier(model(), in_validation, pre, config, tmp_path / "validating")
    saved = torch.load(tmp_path / "validating" / "train_state.pt", weights_only=True)
    assert saved["step"] == 9 and saved["history"] == "[]"  # epoch 1 trained, not yet measured
    resumed, history = train_classifier(model(), small_fmnist, pre, config, tmp_path / "validating")
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["train_loss"] > 0
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_pickled_model_is_refused_with_what_to_save_instead(tmp_path: Path):
    """A whole pickled model loads only by running the file's code: refused (weights_only), saying what to save;
    torch's own advice (weights_only=False) is not passed on."""
    from edgekd.models import read_state_dict

    torch.save(create_model("test_resnet", 10), tmp_path / "model.pth")
    with pytest.raises(EdgekdError, match=r"pickled Python objects.*state_dict\(\)") as caught:
        read_state_dict(tmp_path / "model.pth")
    assert "weights_only" not in str(caught.value)


def test_a_checkpoint_saved_through_a_wrapper_loads(tmp_path: Path):
    """Weights as training frameworks save them: under a Lightning module's attribute ("model.", beside a loss's
    buffer) or torch.compile's "_orig_mod.", inside a {"state_dict": ...} file; the model gets exactly its weights."""
    from edgekd.models import load_weights, read_state_dict

    torch.manual_seed(1)
    trained = create_model("test_resnet", 10).state_dict()
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in trained.items()},
                               "criterion.weight": torch.ones(10)}, "epoch": 3}, tmp_path / "last.ckpt")
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in trained.items()}, str(tmp_path / "compiled.safetensors"))
    for name in ("last.ckpt", "compiled.safetensors"):
        model = create_model("test_resnet", 10)
        assert not load_weights(model, read_state_dict(tmp_path / name), name, allow_head_mismatch=True)
        for key, value in trained.items():
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    twice = {f"{prefix}{k}": v for prefix in ("model.", "model_ema.module.") for k, v in trained.items()}
    with pytest.raises(EdgekdError, match="holds the model twice, under 'model.' and 'model_ema.module.'"):
        load_weights(create_model("test_resnet", 10), twice, "ema.ckpt", allow_head_mismatch=True)
    # a distillation wrapper's student and teacher share key names, not shapes: the student's are taken
    wider = {k: torch.zeros(tuple(d * 2 for d in v.shape)) if v.ndim else v for k, v in trained.items()}
    pair = {**{f"student.{k}": v for k, v in trained.items()}, **{f"teacher.{k}": v for k, v in wider.items()}}
    model = create_model("test_resnet", 10)
    load_weights(model, pair, "kd.ckpt", allow_head_mismatch=False)
    for key, value in trained.items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    other = {f"model.{k}": v for k, v in create_model("test_vit", 10).state_dict().items()}
    with pytest.raises(EdgekdError, match="does not fit"):  # another architecture is still named as such
        load_weights(create_model("test_resnet", 10), other, "vit.ckpt", allow_head_mismatch=True)
    # a resnet's blocks ("layer1.0.bn1.weight") hold a few of an efficientnet's names: not "the model twice"
    with pytest.raises(EdgekdError, match="does not fit") as caught:
        load_weights(create_model("test_efficientnet", 10), trained, "resnet.pth", allow_head_mismatch=True)
    assert "twice" not in str(caught.value)


def test_a_transformer_checkpoint_at_another_input_size_names_the_option(tmp_path: Path):
    from edgekd.models import load_weights

    trained = create_model("test_vit", 10).state_dict()  # its own size
    with pytest.raises(EdgekdError, match="pos_embed .*pass the --input-size it was trained at"):
        load_weights(create_model("test_vit", 10, (32, 32)), trained, "vit.pth", allow_head_mismatch=True)


def test_a_timm_checkpoint_with_ema_weights_says_which_it_loads(tmp_path: Path, caplog):
    from edgekd.models import read_state_dict

    torch.save({"state_dict": {"a": torch.zeros(1)}, "state_dict_ema": {"a": torch.ones(1)}}, tmp_path / "last.pth")
    with caplog.at_level("INFO"):
        assert read_state_dict(tmp_path / "last.pth")["a"].item() == 0.0
    assert "using its 'state_dict' weights (it also holds 'state_dict_ema'" in caplog.text
