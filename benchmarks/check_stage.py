"""Benchmark: the check stage's seconds per question, before and after issue 11 (CPU, this machine).

* **before** — the per-question loop the check stage ran until issue 11 (re-implemented here from the
  public functions it called): for every question, PyTorch ``answer`` + ``first_token_logits`` and ONNX
  Runtime ``answer`` + ``first_token_logits``, plus both image embeddings once per image. Each image is
  encoded up to four times per question, and the prefill runs twice on each side.
* **after (cold)** — the source's references computed once (image encoded once per image, questions
  batched, first-token logits from the same prefill as the answer), then the artifact compared;
* **after (warm)** — references from the cache (a rebuild, ``verify``, another recipe on the same
  source and split): only the artifact runs.

Usage::

    .venv/bin/python benchmarks/check_stage.py [--before-questions 96] [--full-size CKPT --max-samples 16]

``--full-size`` runs the after-path on an existing export of the 1.5B-shape random checkpoint
(``benchmarks/export_full_size.py`` writes one) with ``max_samples`` stratified questions.
Writes ``benchmarks/results/check_stage.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "check_stage.json"


def _before(loaded, vlm, samples, max_new_tokens: int) -> float:
    """The pre-issue-11 loop (see the module docstring); returns seconds."""
    from medlite.checkpoints import generate

    seen = set()
    t0 = time.perf_counter()
    for s in samples:
        image = s.load_image()
        generate.answer(loaded, image, s.question, max_new_tokens=max_new_tokens)
        vlm.answer(image, s.question, max_new_tokens=max_new_tokens)
        generate.first_token_logits(loaded, image, s.question)
        vlm.first_token_logits(image, s.question)
        if s.image_id not in seen:
            seen.add(s.image_id)
            generate.image_embeddings(loaded, image)
            vlm.image_embeddings(image)
    return time.perf_counter() - t0


def _after(loaded, vlm, samples, options, ctx, identity) -> dict:
    from medlite.pipeline.references import references_for
    from medlite.checks import compare

    t0 = time.perf_counter()
    refs = references_for(lambda: loaded, identity, samples, max_new_tokens=options.max_new_tokens,
                          batch_size=options.batch_size, ctx=ctx)
    t_refs = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = compare(refs, vlm, samples, options, ctx)
    t_cmp = time.perf_counter() - t1
    return {"references_seconds": round(t_refs, 2), "compare_seconds": round(t_cmp, 2),
            "cold_seconds": round(t_refs + t_cmp, 2), "warm_seconds": round(t_cmp, 2),
            "metrics": {k: res.metrics[k] for k in ("n", "n_images", "agreement", "mean_kl", "vision_cosine")}}


def demo(args) -> dict:
    from medlite.pipeline.references import select_samples
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset
    from medlite.export import export_onnx
    from medlite.recipes.options import CheckOptions
    from medlite.runtime import OnnxVlm
    from medlite import artifacts as af

    ctx = RunContext(quiet=True)
    loaded = load_model(ensure_demo_model(ctx), ctx=ctx)
    samples = load_dataset("builtin:micro-med-vqa", split="test")
    out = Path(tempfile.mkdtemp(prefix="medlite-check-bench-"))
    export_onnx(loaded, out, ctx=ctx, precision="fp16")
    vlm = OnnxVlm.open(out, providers=["CPUExecutionProvider"])
    options = CheckOptions()
    sub = select_samples(samples, args.before_questions)
    before = _before(loaded, vlm, sub, options.max_new_tokens)
    cold_ctx = RunContext(cache_dir=Path(tempfile.mkdtemp(prefix="medlite-refs-")), quiet=True)
    identity = af.source_identity(loaded.source.to_dict(), loaded.template.name)
    after = _after(loaded, vlm, samples, options, cold_ctx, identity)
    warm = _after(loaded, vlm, samples, options, cold_ctx, identity)   # references now cached
    n = len(samples)
    return {"model": loaded.name, "questions": n, "images": after["metrics"]["n_images"],
            "before": {"questions": len(sub), "seconds": round(before, 2),
                       "seconds_per_question": round(before / len(sub), 4)},
            "after_cold": {"seconds": after["cold_seconds"], "seconds_per_question": round(after["cold_seconds"] / n, 4),
                           "references_seconds": after["references_seconds"], "compare_seconds": after["compare_seconds"]},
            "after_warm": {"seconds": warm["compare_seconds"], "references_cached_seconds": warm["references_seconds"],
                           "seconds_per_question": round((warm["compare_seconds"] + warm["references_seconds"]) / n, 4)},
            "speedup_cold": round((before / len(sub)) / (after["cold_seconds"] / n), 1),
            "speedup_warm": round((before / len(sub)) / ((warm["compare_seconds"] + warm["references_seconds"]) / n), 1),
            "metrics": after["metrics"]}


def full_size(args) -> dict:
    from medlite import artifacts as af
    from medlite.pipeline.references import select_samples
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.evaluation.vqa import load_dataset
    from medlite.recipes.options import CheckOptions
    from medlite.runtime import OnnxVlm

    ctx = RunContext(cache_dir=Path(tempfile.mkdtemp(prefix="medlite-refs-")), quiet=True)
    t0 = time.perf_counter()
    loaded = load_model(Path(args.full_size), ctx=ctx)
    t_load = time.perf_counter() - t0
    vlm = OnnxVlm.open(Path(args.export), providers=["CPUExecutionProvider"])
    samples = select_samples(load_dataset("builtin:micro-med-vqa", split="test"), args.max_samples)
    identity = af.source_identity(loaded.source.to_dict(), loaded.template.name)
    options = CheckOptions(max_new_tokens=args.max_new_tokens)
    after = _after(loaded, vlm, samples, options, ctx, identity)
    n = len(samples)
    return {"checkpoint": str(args.full_size), "load_seconds": round(t_load, 1), "questions": n,
            "max_new_tokens": options.max_new_tokens, **after,
            "seconds_per_question_cold": round(after["cold_seconds"] / n, 2),
            "seconds_per_question_warm": round(after["compare_seconds"] / n, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-questions", type=int, default=96, help="questions timed with the old loop")
    ap.add_argument("--full-size", help="full-size checkpoint folder (skips the demo-model part)")
    ap.add_argument("--export", help="its ONNX export folder (fp16 or fp32)")
    ap.add_argument("--max-samples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--busy", action="store_true", help="record that other jobs were running")
    args = ap.parse_args()
    result = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    key = "full_size" if args.full_size else "demo"
    run = full_size(args) if args.full_size else demo(args)
    run.update({"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine_busy": args.busy,
                "cpus": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)})
    result[key] = run
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(run, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
