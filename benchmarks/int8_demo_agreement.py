"""Benchmark/driver: INT8 on the demo model, answers vs the fp32 source on Micro Med-VQA.

For each configuration: a fresh copy of the demo model → ``apply_int8`` (calibration set of
``--samples`` train pairs, its own held-out slice for the sensitivity pass) → fp32 export with the
registered Q/DQ passes applied → ``OnnxVlm`` (ORT_ENABLE_BASIC: the Q/DQ semantics TensorRT runs; see
docs/quantization-int8.md) → compared with the fp32 source (PyTorch).

Two evaluations (``--split``):

* ``test`` — greedy answers on the test split (the gate; report it, never choose on it);
* ``heldout`` — the calibration set's held-out slice (train-split images never used to calibrate)
  *minus* the pairs the sensitivity pass sees: first-answer-token logits of every pair, so settings
  are chosen on data that neither calibrated nor chose the fp16 fallback. Metrics: top-1 agreement,
  mean KL, and the **top-2 gap shift** δ = (l₁ − l₂)_fp32 − (l₁ − l₂)_int8 on the fp32 top-2 tokens:
  a question flips iff δ exceeds its fp32 margin, so ``rms_gap_shift`` (and ``tie_kl`` = mean δ²/8,
  the KL that shift would cause at an exact two-way tie) measures what near ties see, while the plain
  KL is squashed by the held-out's confident answers (none of its margins is below 0.26).

Configurations: ``vision`` (vision int8 only), ``all`` (vision int8 + w8a8, SmoothQuant 0.5), ``llm`` (w8a8 only),
``all-text`` (as ``all`` but the decoder calibrated on text-only feeds: the image tokens removed),
``plain`` (both, no SmoothQuant, no sensitivity fallback — the plain quantize_static baseline);
``--set key=value`` overrides a ``QuantizeOptions`` field for every configuration of the run; the held-out
evaluation leaves out exactly the ``sensitivity_rows`` pairs the pass judged on (and, with ``--exclude-rows N``,
those of ``sensitivity_rows=N`` too, so runs of different sizes share their unseen pairs).

Usage::

    nice .venv/bin/python benchmarks/int8_demo_agreement.py --configs vision,all,all-text,plain [--cache DIR]
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/int8_demo_agreement.py --split heldout \
        --configs all --samples 128 --set activation_calibration=percentile --set percentile=99.999

``--split test`` writes ``benchmarks/results/int8_demo_agreement.json``; every run (either split)
appends one line per configuration to ``benchmarks/results/int8_demo_heldout.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "int8_demo_agreement.json"
RUNS = ROOT / "benchmarks" / "results" / "int8_demo_heldout.jsonl"
CONFIGS = {
    "vision": dict(vision="int8", llm="fp16"),
    "all": dict(vision="int8", llm="w8a8"),
    "llm": dict(vision="fp16", llm="w8a8"),
    "all-text": dict(vision="int8", llm="w8a8"),
    "plain": dict(vision="int8", llm="w8a8", smoothquant_alpha=None, sensitivity=False),
}
SOURCE: list = []


def _answers(fn, samples, bs=16):
    out = []
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        out += fn([s.load_image() for s in chunk], [s.question for s in chunk])
    return out


def _first_logits(evaluate_rows, samples, bs=32) -> np.ndarray:
    """First-answer-token logits ``[len(samples), vocab]``; each image encoded once per chunk."""
    from medlite.calibration.forward import image_key

    out = []
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        keys = [image_key(s) for s in chunk]
        uniq = list(dict.fromkeys(keys))
        images = [chunk[keys.index(k)].load_image() for k in uniq]
        _, first, _ = evaluate_rows(images, [uniq.index(k) for k in keys], [s.question for s in chunk])
        out.append(np.asarray(first, dtype=np.float64))
    return np.concatenate(out)


def gap_metrics(ref: np.ndarray, cand: np.ndarray) -> dict:
    """Top-1 agreement, mean KL and the top-2 gap shift of ``cand`` against ``ref`` (rows of logits)."""
    from medlite.checks import kl_divergence

    top2 = np.argsort(-ref, axis=1)[:, :2]
    rows = np.arange(ref.shape[0])
    margin = ref[rows, top2[:, 0]] - ref[rows, top2[:, 1]]
    delta = margin - (cand[rows, top2[:, 0]] - cand[rows, top2[:, 1]])
    kl = [kl_divergence(r, c) for r, c in zip(ref, cand)]
    return {"rows": int(ref.shape[0]), "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
            "mean_kl": float(np.mean(kl)), "rms_gap_shift": float(np.sqrt(np.mean(delta ** 2))),
            "mean_abs_gap_shift": float(np.mean(np.abs(delta))), "max_abs_gap_shift": float(np.max(np.abs(delta))),
            "tie_kl": float(np.mean(delta ** 2) / 8), "frac_gap_shift_over_0.05": float(np.mean(np.abs(delta) > 0.05)),
            "frac_gap_shift_over_0.1": float(np.mean(np.abs(delta) > 0.1)), "min_source_margin": float(margin.min()),
            "source_margins_below_0.1": int(np.sum(margin < 0.1)),
            "flips_among_margin_below_0.1": int(np.sum((margin < 0.1) & (ref.argmax(1) != cand.argmax(1))))}


def _apply_passes(state, out: Path, ctx) -> None:
    import onnx

    from medlite.pipeline.contract import PassContext
    from medlite.export.files import write_onnx

    for g, plan in state.export_plan.graphs.items():
        proto = onnx.load(str(out / f"{g}.onnx"))
        for _, fn in plan.passes:
            proto = fn(proto, PassContext(graph=g, ctx=ctx, model=state.model, state=state, tmp_dir=out / ".tmp" / g))
        write_onnx(proto, out / f"{g}.onnx")


def build_artifact(name: str, opts: dict, demo: Path, calib, ctx, work: Path):
    """Quantize a fresh demo model with ``opts`` and export it; returns (OnnxVlm, StageResult, seconds, folder)."""
    import medlite.compress.int8.stage as stage
    import medlite.runtime.vlm as vlm_mod
    from medlite.pipeline.contract import BuildState
    from medlite.checkpoints import load_model
    from medlite.compress.int8.calib_feeds import decoder_feeds
    from medlite.export import export_onnx
    from medlite.export.graphs import text_dims
    from medlite.recipes.options import QuantizeOptions
    from medlite.runtime import OnnxVlm
    from medlite.runtime.sessions import open_session

    loaded = load_model(demo, ctx=ctx)
    state = BuildState(ctx=ctx, recipe=None, target=None, work=work, source=None, model=loaded, calibration=calib)
    orig = stage._feeds
    if name == "all-text":   # the decoder calibrated without image tokens (what a text-only loop sees)
        def text_feeds(st, graph, samples, *, batch_size=8):
            if graph != "decoder":
                return orig(st, graph, samples, batch_size=batch_size)
            loop = st.forward_loop(samples=samples, batch_size=batch_size)
            return decoder_feeds(loop, st.model.model, text_dims(st.model.model), batch_size=batch_size,
                                 text_only=list(samples) == list(calib.samples))
        stage._feeds = text_feeds
    t0 = time.perf_counter()
    try:
        res = stage.apply_int8(state, 0, QuantizeOptions(**opts))
    finally:
        stage._feeds = orig
    t_quant = time.perf_counter() - t0
    out = work / name
    export_onnx(loaded, out, ctx=ctx, precision="fp32")
    _apply_passes(state, out, ctx)
    # until the export writes the graphs' quantization records (then OnnxVlm picks "basic" itself)
    vlm_mod.open_session = lambda *a, **k: open_session(*a, **{**k, "optimization": "basic"})
    return OnnxVlm.open(out, ctx=ctx), res, t_quant, out


def eval_test(vlm, test, src) -> dict:
    """Greedy answers on the test split against the source's (the gate's figures)."""
    from medlite.checks import mean_cosine
    from medlite.checkpoints.generate import image_embeddings
    from medlite.evaluation.scoring import closed_correct, normalize

    art = _answers(lambda ims, qs: vlm.answer_batch(ims, qs, max_new_tokens=16), test)
    closed = [i for i, s in enumerate(test) if str(s.answer_type).upper() == "CLOSED"]
    agree = [normalize(a) == normalize(b) for a, b in zip(src, art)]
    acc = lambda preds: sum(closed_correct(preds[i], test[i].answer) for i in closed) / max(len(closed), 1)  # noqa: E731
    seen, cos = set(), []
    for s in test:
        if s.image_id in seen:
            continue
        seen.add(s.image_id)
        cos.append(mean_cosine(image_embeddings(SOURCE[0], s.load_image()), vlm.image_embeddings(s.load_image())))
    return {"agreement": sum(agree) / len(agree), "closed_agreement": sum(agree[i] for i in closed) / max(len(closed), 1),
            "source_closed_acc": acc(src), "artifact_closed_acc": acc(art),
            "closed_acc_drop_points": 100 * (acc(src) - acc(art)), "vision_cosine": float(sum(cos) / len(cos))}


def selection_slice(calib, rows: int, also_exclude=()) -> list:
    """The held-out pairs the sensitivity pass does not see: it takes ``stage._subset(heldout, rows)``
    (``rows`` = ``sensitivity_rows``); ``also_exclude`` drops the pass rows of other sizes too, so runs
    with different ``sensitivity_rows`` are compared on the same unseen pairs."""
    from medlite.compress.int8.stage import _subset

    used = {s.qid for n in (rows, *also_exclude) for s in _subset(list(calib.heldout), n)}
    return [s for s in calib.heldout if s.qid not in used]


def _choice_facts(comps: dict) -> dict:
    """Kept fp16 layers and the pass's own tie KL per graph (on its rows, the other graph fp32): the mean,
    the upper confidence bound the gate read, its confidence and target, and whether the gate held."""
    return {"kept_fp16": {g: [k["layer"] for k in c["kept_fp16"]] for g, c in comps.items()},
            "pass_tie_kl": {g: c["sensitivity"]["metric_final"].get("tie_kl") for g, c in comps.items()
                            if "sensitivity" in c},
            "pass_tie_kl_upper": {g: c["sensitivity"]["metric_final"].get("tie_kl_upper") for g, c in comps.items()
                                  if "sensitivity" in c},
            "pass_confidence": {g: c["sensitivity"].get("confidence") for g, c in comps.items() if "sensitivity" in c},
            "pass_target": {g: c["sensitivity"].get("target_tie_kl") for g, c in comps.items() if "sensitivity" in c},
            "pass_gate_holds": {g: c["sensitivity"].get("gate_holds") for g, c in comps.items() if "sensitivity" in c}}


def heldout_rows(calib, args, overrides: dict) -> list:
    """The held-out pairs to evaluate on: unseen by the pass (``--rows unseen``) or its own (``--rows pass``)."""
    from medlite.compress.int8.stage import _subset
    from medlite.recipes.options import QuantizeOptions

    rows = overrides.get("sensitivity_rows", QuantizeOptions.model_fields["sensitivity_rows"].default)
    if args.rows == "pass":
        return _subset(list(calib.heldout), rows)
    return selection_slice(calib, rows, args.exclude_rows)


def _parse_sets(items) -> dict:
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        out[k] = None if v in ("null", "none", "None") else json.loads(v) if v[:1] in "0123456789-[{tf" else v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="vision,all,all-text,plain")
    ap.add_argument("--split", choices=["test", "heldout"], default="test")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--set", action="append", help="QuantizeOptions override key=value (every configuration)")
    ap.add_argument("--exclude-rows", type=int, action="append", default=[],
                    help="heldout: also leave out the pass rows of sensitivity_rows=N (same unseen pairs across N)")
    ap.add_argument("--rows", choices=["unseen", "pass"], default="unseen",
                    help="heldout: evaluate on the pairs the pass did not see (default) or on its own rows "
                         "(diagnostic: the combined graphs on the rows each graph was chosen on)")
    ap.add_argument("--note", default="")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medlite-int8-demo"))
    args = ap.parse_args(argv)
    from medlite.calibration.calibset import build_calibration_set
    from medlite.checkpoints import load_model
    from medlite.checkpoints.generate import answer_batch, evaluate_rows
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset
    from medlite.recipes.options import QuantizeOptions

    ctx = RunContext(cache_dir=args.cache, quiet=True) if args.cache else RunContext(quiet=True)
    demo = ensure_demo_model(ctx)
    SOURCE.append(load_model(demo, ctx=ctx))
    calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), args.samples, ctx=ctx)
    overrides = _parse_sets(args.set)
    t0 = time.perf_counter()
    if args.split == "test":
        test = load_dataset("builtin:micro-med-vqa", split="test")
        src = _answers(lambda ims, qs: answer_batch(SOURCE[0], ims, qs, max_new_tokens=16), test)
    else:
        test = heldout_rows(calib, args, overrides)
        src = _first_logits(lambda *a: evaluate_rows(SOURCE[0], *a, max_new_tokens=1), test)
    result = {"split": args.split, "questions": len(test), "calibration": calib.to_dict(),
              "source_seconds": round(time.perf_counter() - t0, 1), "load_avg": os.getloadavg(), "configs": {}}
    for name in args.configs.split(","):
        opts = {**CONFIGS[name], **overrides}
        vlm, res, t_quant, out = build_artifact(name, opts, demo, calib, ctx, args.work)
        if args.split == "test":
            metrics = eval_test(vlm, test, src)
        else:
            metrics = gap_metrics(src, _first_logits(lambda *a: vlm.evaluate_rows(*a, max_new_tokens=1), test))
        files = sum((out / f).stat().st_size for f in os.listdir(out) if f.endswith((".onnx", ".data")) and
                    f.split(".")[0] in ("vision", "decoder"))
        comps = res.manifest["components"]
        row = {**metrics, "quantize_seconds": round(t_quant, 1), "vision_decoder_file_bytes": files,
               "summary": res.summary, **_choice_facts(comps),
               "sensitivity_rows": QuantizeOptions(**opts).sensitivity_rows,
               "excluded_pass_rows": sorted(set(args.exclude_rows)) if args.split == "heldout" else [],
               "eval_rows": args.rows if args.split == "heldout" else "test"}
        result["configs"][name] = {**row, "components": res.manifest["components"]}
        print(name, json.dumps(row), flush=True)
        RUNS.parent.mkdir(parents=True, exist_ok=True)
        with RUNS.open("a") as f:
            f.write(json.dumps({"split": args.split, "config": name, "options": opts, "samples": args.samples,
                                "note": args.note, "load_avg": [round(x, 2) for x in os.getloadavg()], **row},
                               sort_keys=True) + "\n")
    if args.split == "test":
        RESULT.write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
