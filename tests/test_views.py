"""Mirrored fixed views (edgekd.distill.views): which images are flipped, and how the batch is flipped."""

from __future__ import annotations

import torch

from edgekd.distill.views import MirrorDraw, mirror, view_rows


def test_mirror_draw_depends_only_on_seed_epoch_and_image():
    draw, again = MirrorDraw(1000, seed=3), MirrorDraw(1000, seed=3)
    everything = torch.arange(1000)
    epoch0 = draw.flipped(everything, epoch=0)
    assert 400 < int(epoch0.sum()) < 600  # about half of the images, drawn independently
    # asked in another order, in pieces, after another epoch (as a resumed run or another rank asks): the same bits
    again.flipped(everything, epoch=5)
    shuffled = torch.randperm(1000)
    assert torch.equal(again.flipped(shuffled[:500], epoch=0), epoch0[shuffled[:500]])
    assert torch.equal(again.flipped(shuffled[500:], epoch=0), epoch0[shuffled[500:]])
    assert not torch.equal(draw.flipped(everything, epoch=1), epoch0)  # a new draw each epoch
    assert not torch.equal(MirrorDraw(1000, seed=4).flipped(everything, epoch=0), epoch0)


def test_every_model_gets_the_same_samples_mirrored_and_the_cache_a_row_per_view():
    student, teacher = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 32, 32)  # models at different input sizes
    flipped = torch.tensor([True, False, True, False])
    out_student, out_teacher = mirror((student, teacher), flipped)
    for before, after in ((student, out_student), (teacher, out_teacher)):
        for i in range(4):
            expected = before[i].flip(-1) if flipped[i] else before[i]
            assert torch.equal(after[i], expected)
    assert view_rows(torch.tensor([0, 0, 7, 7]), torch.tensor([False, True, False, True])).tolist() == [0, 1, 14, 15]
