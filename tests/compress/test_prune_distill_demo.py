"""Acceptance on the demo model (slow): pruning 25 % of the MLP width, or half of the KV groups with
their query heads, then distillation from the source, recovers the closed accuracy on the held-out
Micro Med-VQA test split to within 2 points; the pruned model's ONNX export answers like PyTorch.

The options are the shipped recipes' (recipes/prune-mlp25.yaml, recipes/prune-attn-half.yaml); the
test split is only evaluated, never used for early stopping or tuning (that is the calibration
set's own held-out slice).
"""
from __future__ import annotations

import pytest

from compress_state import make_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    from medlite.calibration.calibset import build_calibration_set
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset

    ctx = RunContext(quiet=True)
    path = ensure_demo_model(ctx)
    calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), 128, ctx=ctx)
    return ctx, path, calib, load_dataset("builtin:micro-med-vqa", split="test")


def _recipe_stages(name: str) -> dict:
    from medlite.recipes import load_recipe

    r = load_recipe(f"recipes/{name}.yaml").recipe
    return {s.name: s.options for s in r.stages}


def _accuracy(loaded, samples, ctx) -> float:
    from medlite.evaluation.evaluate import evaluate

    return evaluate(loaded, samples, ctx=ctx, max_new_tokens=8)["metrics"]["closed_accuracy"]


@pytest.mark.parametrize("recipe", ["prune-mlp25", "prune-attn-half"])
def test_distillation_recovers_accuracy(demo, recipe):
    from medlite.checkpoints import load_model
    from medlite.compress.distill.stage import run as distill
    from medlite.compress.prune.stage import run as prune

    ctx, path, calib, test = demo
    stages = _recipe_stages(recipe)
    source, student = load_model(path, ctx=ctx), load_model(path, ctx=ctx)
    base = _accuracy(source, test, ctx)
    state = make_state(ctx, student, calib, source=source, eval_samples=test)
    state.results["stages[0].prune"] = pr = prune(state, 0, stages["prune"])
    assert pr.bytes_after < pr.bytes_before and pr.manifest["params_after"] < pr.manifest["params_before"]
    pruned = _accuracy(student, test, ctx)
    dr = distill(state, 1, stages["distill"])
    distilled = _accuracy(student, test, ctx)
    print(f"{recipe}: closed accuracy source {base:.4f} · pruned {pruned:.4f} · distilled {distilled:.4f} · "
          f"params {pr.manifest['params_before']:,} → {pr.manifest['params_after']:,} · {dr.summary}")
    assert base - distilled <= 0.02, (base, pruned, distilled)


def test_pruned_demo_model_exports_and_answers_like_pytorch(demo, tmp_path):
    from medlite.checkpoints import load_model
    from medlite.checkpoints.generate import answer_batch
    from medlite.compress.prune.stage import run as prune
    from medlite.export import export_onnx
    from medlite.runtime import OnnxVlm

    ctx, path, calib, test = demo
    student = load_model(path, ctx=ctx)
    prune(make_state(ctx, student, calib), 0, _recipe_stages("prune-attn-half")["prune"].model_copy(
        update={"mlp": 0.25}))
    export_onnx(student, tmp_path, ctx=ctx, precision="fp32")
    vlm = OnnxVlm.open(tmp_path)
    for i in range(0, len(test), 48):
        chunk = test[i:i + 48]
        images, questions = [s.load_image() for s in chunk], [s.question for s in chunk]
        assert vlm.answer_batch(images, questions, max_new_tokens=8) == \
            answer_batch(student, images, questions, max_new_tokens=8)
