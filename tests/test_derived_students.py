"""Teacher-derived students: shallower copies of the teacher, initialised from its weights, rebuilt by name."""

import pytest
import torch
from safetensors.torch import save_file

from edgekd.errors import EdgekdError
from edgekd.models import create_model, preprocess_for
from edgekd.distill.students import build_student, derive_from_teacher, load_student, parse_derived
from edgekd.types import StudentCheckpoint


def test_vit_keeps_every_other_block_with_the_teachers_weights():
    teacher = create_model("test_vit", 10, None).eval()
    student = derive_from_teacher("derived:test_vit:depth=0.5", teacher.state_dict(), 10, None)
    assert len(teacher.blocks) == 6 and len(student.blocks) == 3
    for new, old in enumerate((0, 2, 4)):
        for key, value in student.blocks[new].state_dict().items():
            assert torch.equal(value, teacher.blocks[old].state_dict()[key])
    assert torch.equal(student.head.weight, teacher.head.weight)
    assert [f["module"] for f in student.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]


def test_cnn_keeps_fewer_blocks_per_stage():
    teacher = create_model("test_convnext", 4, (32, 32)).eval()
    student = derive_from_teacher("derived:test_convnext:depth=0.5", teacher.state_dict(), 4, (32, 32))
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_build_student_rebuilds_the_same_architecture_for_checkpoints(tmp_path):
    name = "derived:test_vit:depth=0.5"
    trained = derive_from_teacher(name, create_model("test_vit", 3, None).state_dict(), 3, None)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "student.safetensors"))
    checkpoint = StudentCheckpoint(model_name=name, weights_path=tmp_path / "student.safetensors", num_classes=3,
                                   class_names=("a", "b", "c"), preprocess=preprocess_for(trained))
    reloaded = load_student(checkpoint)
    sample = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(reloaded(sample), trained(sample))
    assert build_student("test_resnet", 3, (32, 32)).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name, message", [("derived:test_vit:depth=1.5", "bad derived"),
                                           ("derived:test_vit", "bad derived"),
                                           ("derived:no_such_net:depth=0.5", "unknown model"),
                                           ("derived:test_resnet:depth=0.5", "cannot derive")])
def test_bad_derived_names(name, message):
    with pytest.raises(EdgekdError, match=message):
        build_student(name, 3, (32, 32))


def test_alias_resolves_in_the_name():
    assert parse_derived("derived:vit_base:depth=0.5").name == "derived:vit_base_patch16_224:depth=0.5"
