"""Benchmark: the shipped prune recipes' prune + distill stages on the demo model (CPU, this machine).

For each recipe (``prune-mlp25``, ``prune-attn-half``): closed accuracy of the source, of the pruned
model and of the distilled model on the held-out Micro Med-VQA test split (evaluated only — early
stopping uses the calibration set's own held-out slice), parameters and bytes before/after, and
the stage times (distillation wall time includes teacher answers and logits). Writes
``benchmarks/results/prune_distill_demo.json``. Usage::

    nice .venv/bin/python benchmarks/prune_distill_demo.py [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "prune_distill_demo.json"


def closed_accuracy(loaded, samples, ctx) -> float:
    from medlite.evaluation.evaluate import evaluate

    return round(evaluate(loaded, samples, ctx=ctx, max_new_tokens=8)["metrics"]["closed_accuracy"], 4)


def one_recipe(name: str, path, calib, test, ctx, base: float) -> dict:
    from medlite.pipeline.contract import BuildState
    from medlite.checkpoints import load_model
    from medlite.compress.distill.stage import run as distill
    from medlite.compress.prune.stage import run as prune
    from medlite.recipes import load_recipe

    opts = {s.name: s.options for s in load_recipe(ROOT / "recipes" / f"{name}.yaml").recipe.stages}
    source, student = load_model(path, ctx=ctx), load_model(path, ctx=ctx)
    state = BuildState(ctx=ctx, recipe=None, target=None, work=None, source=SimpleNamespace(model=lambda: source),
                       model=student, calibration=calib, eval_samples=list(test))
    t = time.perf_counter()
    pr = prune(state, 0, opts["prune"])
    prune_s = time.perf_counter() - t
    state.results["stages[0].prune"] = pr
    pruned = closed_accuracy(student, test, ctx)
    t = time.perf_counter()
    dr = distill(state, 1, opts["distill"])
    distill_s = time.perf_counter() - t
    distilled = closed_accuracy(student, test, ctx)
    return {"prune": opts["prune"].model_dump(exclude_defaults=True), "prune_s": round(prune_s, 1),
            "distill_s": round(distill_s, 1), "distill_train_s": state.timings.get("distill_train_s"),
            "dims_before": pr.manifest["dims_before"], "dims_after": pr.manifest["dims_after"],
            "params": [pr.manifest["params_before"], pr.manifest["params_after"]],
            "bytes": [pr.bytes_before, pr.bytes_after], "closed_accuracy": {
                "source": base, "pruned": pruned, "distilled": distilled},
            "drop_points": {"pruned": round(100 * (base - pruned), 2), "distilled": round(100 * (base - distilled), 2)},
            "distill": {k: dr.manifest[k] for k in ("steps_run", "best_step", "stopped_early", "train_pairs",
                                                      "heldout_pairs", "heldout_kl", "heldout_before",
                                                      "heldout_after", "heldout_teacher")},
            "distill_summary": dr.summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=["prune-mlp25", "prune-attn-half"])
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    import torch

    from medlite.calibration.calibset import build_calibration_set
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset

    torch.set_num_threads(a.threads)
    ctx = RunContext()
    path = ensure_demo_model(ctx)
    calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), 128, ctx=ctx)
    test = load_dataset("builtin:micro-med-vqa", split="test")
    result = {"benchmark": "prune_distill_demo", "threads": a.threads, "demo_model": path.name,
              "machine": {"cpus": os.cpu_count(), "loadavg_at_start": list(os.getloadavg())}, "recipes": {}}
    from medlite.checkpoints import load_model

    base = closed_accuracy(load_model(path, ctx=ctx), test, ctx)
    for name in a.recipes:
        result["recipes"][name] = one_recipe(name, path, calib, test, ctx, base)
        print(json.dumps(result["recipes"][name], indent=1))
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
