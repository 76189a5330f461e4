"""Benchmark / sweep: distillation settings for ``prune-attn-half`` on the demo model, chosen on held-out data.

One run = prune half of the KV groups (activation importance, or a forced choice of kept group per
layer with ``--keep``), distill with the recipe's options overridden by ``--opts`` (JSON), then score
the student on the **selection set**: 480 pairs spread over the calibration set's held-out slice
(train-split images of the 4 sources the student never trains on). The test split is evaluated only
with ``--test``, for the setting already chosen. Each run appends one JSON line to ``--out``
(``benchmarks/results/prune_attn_sweep.jsonl`` holds the runs behind docs/pruning-distillation.md)::

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/prune_attn_sweep.py --opts '{"hidden_weight": 1.0}'
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/prune_attn_sweep.py --keep 1,0
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/prune_attn_sweep.py --attn-only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def held_metrics(loaded, samples, teacher_answers, ctx) -> dict:
    """Agreement with the teacher and closed accuracy (overall and per question type) on ``samples``."""
    from medlite.evaluation.evaluate import evaluate
    from medlite.evaluation.scoring import normalize

    r = evaluate(loaded, samples, ctx=ctx, max_new_tokens=8)
    preds = [p["prediction"] if isinstance(p, dict) else p for p in r["predictions"]]
    agree = sum(normalize(a) == normalize(b) for a, b in zip(preds, teacher_answers)) / len(samples)
    byq = {k: round(v["closed_accuracy"], 3) for k, v in r["metrics"]["by_question_type"].items()}
    return {"agree": round(agree, 4), "acc": round(r["metrics"]["closed_accuracy"], 4), "by_question_type": byq}


def attention_only(stage_module) -> None:
    """Sweep knob: train only the attention projections (the recipe's ``trainable`` has no such mode)."""
    orig = stage_module.select_trainable

    def select(model, opts, pruned):
        names = orig(model, opts, pruned)
        for n, p in model.named_parameters():
            if "self_attn" not in n:
                p.requires_grad_(False)
        return names

    stage_module.select_trainable = select


def prune_student(student, source, calib, test, ctx, keep: str):
    """A BuildState around the pruned student (importance-chosen groups, or ``keep`` = "g0,g1,...")."""
    import torch

    from medlite.pipeline.contract import BuildState, StageResult
    from medlite.compress.prune import structured
    from medlite.compress.prune.options import PruneOptions
    from medlite.compress.prune.stage import run as prune

    state = BuildState(ctx=ctx, recipe=None, target=None, work=None, source=SimpleNamespace(model=lambda: source),
                       model=student, calibration=calib, eval_samples=list(test))
    if keep == "auto":
        state.results["stages[0].prune"] = prune(state, 0, PruneOptions(attention_kv_groups=0.5))
    else:
        structured.prune_kv_groups(student.model, [torch.tensor([int(g)]) for g in keep.split(",")])
        state.results["stages[0].prune"] = StageResult(summary="", changed=[], manifest={"attention": {}})
    return state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default="auto", help="kept KV group per layer, e.g. 1,0 (default: importance)")
    ap.add_argument("--opts", default="{}", help="JSON overrides of the recipe's distill options")
    ap.add_argument("--attn-only", action="store_true", help="train only the attention projections")
    ap.add_argument("--test", action="store_true", help="also report the test split (for the chosen setting only)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_attn_sweep.jsonl"))
    a = ap.parse_args()
    import torch

    import medlite.compress.distill.stage as distill_stage
    from medlite.calibration.calibset import build_calibration_set
    from medlite.checkpoints import load_model
    from medlite.compress.distill import data as D
    from medlite.compress.prune.stage import spread
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset
    from medlite.recipes import load_recipe

    torch.set_num_threads(1)
    ctx = RunContext(quiet=True)
    path = ensure_demo_model(ctx)
    calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), 128, ctx=ctx)
    test = load_dataset("builtin:micro-med-vqa", split="test")
    selection = spread(list(calib.heldout), 480)
    source, student = load_model(path, ctx=ctx), load_model(path, ctx=ctx)
    t_answers = D.teacher_answers(source, selection, ctx=ctx, max_new_tokens=8)
    recipe = {s.name: s.options for s in load_recipe(ROOT / "recipes" / "prune-attn-half.yaml").recipe.stages}
    opts = type(recipe["distill"]).model_validate({**recipe["distill"].model_dump(), **json.loads(a.opts)})
    if a.attn_only:
        attention_only(distill_stage)
    state = prune_student(student, source, calib, test, ctx, a.keep)
    t = time.perf_counter()
    dr = distill_stage.run(state, 1, opts)
    out = {"keep": a.keep, "attn_only": a.attn_only, "opts": json.loads(a.opts),
           "distill_s": round(time.perf_counter() - t, 1), "train_s": state.timings.get("distill_train_s"),
           "best_step": dr.manifest["best_step"], "steps_run": dr.manifest["steps_run"],
           "pairs": dr.manifest["train_pairs"], "summary": dr.summary,
           "selection480": held_metrics(student, selection, t_answers, ctx)}
    if a.test:
        # Agreement with the teacher too: the build's agreement gate is the tighter one on this recipe.
        out["test"] = held_metrics(student, test, D.teacher_answers(source, test, ctx=ctx, max_new_tokens=8), ctx)
        out["test_closed_accuracy"] = out["test"]["acc"]
    print(json.dumps(out))
    with open(a.out, "a") as f:
        f.write(json.dumps(out, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
