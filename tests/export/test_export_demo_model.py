"""Acceptance on the built-in demo model: ONNX Runtime answers vs PyTorch on every Micro Med-VQA test question.

Uses the user cache (``$MEDLITE_CACHE`` or the platform cache dir) so the demo model is trained once,
not per test session.
"""
from __future__ import annotations

import pytest

pytest.importorskip("medlite.demo.model", reason="the demo model module has not landed yet")

from medlite.context import RunContext  # noqa: E402

MAX_NEW = 12
BATCH = 16


@pytest.fixture(scope="module")
def demo():
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset
    from medlite.checkpoints import load_model

    ctx = RunContext(quiet=True)
    loaded = load_model(ensure_demo_model(ctx), ctx=ctx)
    samples = load_dataset("builtin:micro-med-vqa", split="test")
    assert len(samples) >= 100
    return ctx, loaded, samples


def _answers(fn, samples) -> list[str]:
    out: list[str] = []
    for i in range(0, len(samples), BATCH):
        chunk = samples[i:i + BATCH]
        out += fn([s.load_image() for s in chunk], [s.question for s in chunk])
    return out


@pytest.fixture(scope="module")
def reference(demo):
    from medlite.checkpoints import generate

    _, loaded, samples = demo
    return _answers(lambda ims, qs: generate.answer_batch(loaded, ims, qs, max_new_tokens=MAX_NEW), samples)


@pytest.mark.slow
def test_fp32_onnx_answers_equal_pytorch(demo, reference, tmp_path_factory):
    from medlite.export import export_onnx
    from medlite.runtime import OnnxVlm

    ctx, loaded, samples = demo
    out = tmp_path_factory.mktemp("demo_fp32")
    assert export_onnx(loaded, out, ctx=ctx).trt_ok
    vlm = OnnxVlm.open(out)
    got = _answers(lambda ims, qs: vlm.answer_batch(ims, qs, max_new_tokens=MAX_NEW), samples)
    diff = [(s.qid, s.question, r, g) for s, r, g in zip(samples, reference, got) if r != g]
    assert not diff, f"{len(diff)}/{len(samples)} answers differ, e.g. {diff[:5]}"
    # and one by one (no batching) on a few, through the streaming path
    for s, r in list(zip(samples, reference))[:8]:
        assert vlm.answer(s.load_image(), s.question, max_new_tokens=MAX_NEW, on_token=lambda _: None) == r


@pytest.mark.slow
def test_fp16_closed_answer_agreement(demo, reference, tmp_path_factory):
    from medlite.export import export_onnx
    from medlite.runtime import OnnxVlm

    ctx, loaded, samples = demo
    out = tmp_path_factory.mktemp("demo_fp16")
    res = export_onnx(loaded, out, ctx=ctx, precision="fp16")
    assert res.trt_ok and all(c["fp16"] == 0 for g in res.fp32_ops.values() for c in g.values())
    vlm = OnnxVlm.open(out)
    closed = [(s, r) for s, r in zip(samples, reference) if s.answer_type == "closed"]
    assert len(closed) >= 100
    got = _answers(lambda ims, qs: vlm.answer_batch(ims, qs, max_new_tokens=MAX_NEW), [s for s, _ in closed])
    agree = sum(g == r for (_, r), g in zip(closed, got)) / len(closed)
    assert agree >= 0.995, f"fp16 closed-answer agreement {agree:.4f} < 0.995"
