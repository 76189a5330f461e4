"""Function matching on blended images (``distill.mixup``): the blend against a numpy reference,
draws fixed by (seed, step), and teacher and student seeing the very same blended pixels."""
from __future__ import annotations

import numpy as np
import torch

from medlite.checkpoints import load_model
from medlite.compress.distill import data as D
from medlite.compress.distill import objective as O
from medlite.compress.distill.options import DistillOptions


def test_blend_is_a_convex_mix_with_another_image_of_the_batch():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = O.mix_images(x, 0.5, seed=3, step=7)
    a, b = x.reshape(5, -1).numpy(), y.reshape(5, -1).numpy()
    for i in range(5):
        # y_i = (1 - w) x_i + w x_j for exactly one j != i and 0 < w <= 0.5 (least squares on two vectors)
        fits = []
        for j in range(5):
            if j == i:
                continue
            d = a[j] - a[i]
            w = float(np.dot(b[i] - a[i], d) / np.dot(d, d))
            fits.append((float(np.abs(a[i] + w * d - b[i]).max()), w, j))
        err, w, j = min(fits)
        assert err < 1e-5 and 0.0 < w <= 0.5, (i, fits)
    assert torch.equal(y, O.mix_images(x, 0.5, seed=3, step=7))           # a function of (seed, step)
    assert not torch.equal(y, O.mix_images(x, 0.5, seed=3, step=8))
    assert not torch.equal(y, O.mix_images(x, 0.5, seed=4, step=7))
    assert torch.equal(O.mix_images(x[:1], 0.5, seed=3, step=7), x[:1])   # nothing to blend with


def test_teacher_and_student_see_the_same_blended_images(tiny_path, cctx, calib, monkeypatch):
    student, teacher = load_model(tiny_path, ctx=cctx), load_model(tiny_path, ctx=cctx)
    exs = [D.encode(student, s, "yes") for s in calib.samples[:4]]
    seen = []
    real = O.forward_answers

    def spy(model, batch, **kw):
        seen.append((model, batch["pixel_values"].clone()))
        return real(model, batch, **kw)

    monkeypatch.setattr(O, "forward_answers", spy)
    opts = DistillOptions(mixup=0.5, batch_size=4)
    obj = O.Objective(student, teacher, D.Batches(student, exs), D.Batches(student, []), opts, ctx=cctx, pruned=None)
    assert obj.online and obj.t_train is None            # no cached teacher logits for blended images
    plain = D.Batches(student, exs).batch([0, 1, 2, 3], torch.float32)["pixel_values"]
    loss = obj.loss([0, 1, 2, 3], 5).detach()
    (s_model, s_px), (t_model, t_px) = seen
    assert s_model is student.model and t_model is teacher.model
    assert torch.equal(s_px, t_px) and not torch.equal(s_px, plain)
    torch.testing.assert_close(s_px, O.mix_images(plain, 0.5, seed=0, step=5))
    # identical weights and identical inputs: the student matches the teacher exactly
    assert float(loss) < 1e-9
    assert float(obj.loss([0, 1, 2, 3], 5).detach()) == float(loss)


def test_plan_says_images_are_blended():
    from medlite.compress.distill.options import plan

    assert "blended up to 50%" in plan(1, DistillOptions(mixup=0.5), None)[0]
    assert "blended" not in plan(1, DistillOptions(), None)[0]
