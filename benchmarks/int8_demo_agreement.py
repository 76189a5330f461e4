"""Benchmark/driver: INT8 on the demo model, answers vs the fp32 source on held-out Micro Med-VQA.

For each configuration: a fresh copy of the demo model → ``apply_int8`` (calibration set of
``--samples`` train pairs, its own held-out slice for the sensitivity pass) → fp32 export with the
registered Q/DQ passes applied → ``OnnxVlm`` (ORT_ENABLE_BASIC: the Q/DQ semantics TensorRT runs; see
docs/quantization-int8.md) → greedy answers on the test split, compared with
``medlite.checkpoints.generate.answer_batch`` on the fp32 source.

Configurations: ``vision`` (vision int8 only), ``all`` (vision int8 + w8a8, SmoothQuant 0.5),
``all-text`` (as ``all`` but the decoder calibrated on text-only feeds: the image tokens removed),
``plain`` (both, no SmoothQuant, no sensitivity fallback — the plain quantize_static baseline).

Usage::

    nice .venv/bin/python benchmarks/int8_demo_agreement.py --configs vision,all,all-text,plain [--cache DIR]

Writes ``benchmarks/results/int8_demo_agreement.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "int8_demo_agreement.json"
CONFIGS = {
    "vision": dict(vision="int8", llm="fp16"),
    "all": dict(vision="int8", llm="w8a8"),
    "all-text": dict(vision="int8", llm="w8a8"),
    "plain": dict(vision="int8", llm="w8a8", smoothquant_alpha=None, sensitivity=False),
}


def _answers(fn, samples, bs=16):
    out = []
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        out += fn([s.load_image() for s in chunk], [s.question for s in chunk])
    return out


def _apply_passes(state, out: Path, ctx) -> None:
    import onnx

    from medlite.build.contract import PassContext
    from medlite.export.files import write_onnx

    for g, plan in state.export_plan.graphs.items():
        proto = onnx.load(str(out / f"{g}.onnx"))
        for _, fn in plan.passes:
            proto = fn(proto, PassContext(graph=g, ctx=ctx, model=state.model, state=state, tmp_dir=out / ".tmp" / g))
        write_onnx(proto, out / f"{g}.onnx")


def run_config(name: str, demo: Path, calib, test, src: list, ctx, work: Path) -> dict:
    import medlite.compress.int8.stage as stage
    import medlite.runtime.vlm as vlm_mod
    from medlite.build.contract import BuildState
    from medlite.checkpoints import load_model
    from medlite.compress.int8.calib_feeds import decoder_feeds
    from medlite.evaluation.scoring import closed_correct, normalize
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
        res = stage.apply_int8(state, 0, QuantizeOptions(**CONFIGS[name]))
    finally:
        stage._feeds = orig
    t_quant = time.perf_counter() - t0
    out = work / name
    export_onnx(loaded, out, ctx=ctx, precision="fp32")
    _apply_passes(state, out, ctx)
    # until the export writes the graphs' quantization records (then OnnxVlm picks "basic" itself)
    vlm_mod.open_session = lambda *a, **k: open_session(*a, **{**k, "optimization": "basic"})
    vlm = OnnxVlm.open(out, ctx=ctx)
    art = _answers(lambda ims, qs: vlm.answer_batch(ims, qs, max_new_tokens=16), test)
    closed = [i for i, s in enumerate(test) if str(s.answer_type).upper() == "CLOSED"]
    agree = [normalize(a) == normalize(b) for a, b in zip(src, art)]
    acc = lambda preds: sum(closed_correct(preds[i], test[i].answer) for i in closed) / max(len(closed), 1)  # noqa: E731
    from medlite.checks import mean_cosine
    from medlite.checkpoints.generate import image_embeddings

    seen, cos = set(), []
    for s in test:
        if s.image_id in seen:
            continue
        seen.add(s.image_id)
        cos.append(mean_cosine(image_embeddings(SOURCE[0], s.load_image()), vlm.image_embeddings(s.load_image())))
    files = sum((out / f).stat().st_size for f in os.listdir(out) if f.endswith((".onnx", ".data")) and
                f.split(".")[0] in ("vision", "decoder"))
    return {"agreement": sum(agree) / len(agree), "closed_agreement": sum(agree[i] for i in closed) / max(len(closed), 1),
            "source_closed_acc": acc(src), "artifact_closed_acc": acc(art),
            "closed_acc_drop_points": 100 * (acc(src) - acc(art)), "vision_cosine": float(sum(cos) / len(cos)),
            "quantize_seconds": round(t_quant, 1), "vision_decoder_file_bytes": files, "summary": res.summary,
            "components": res.manifest["components"]}


SOURCE: list = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="vision,all,all-text,plain")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medlite-int8-demo"))
    args = ap.parse_args(argv)
    from medlite.calibration.calibset import build_calibration_set
    from medlite.checkpoints import load_model
    from medlite.checkpoints.generate import answer_batch
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset

    ctx = RunContext(cache_dir=args.cache, quiet=True) if args.cache else RunContext(quiet=True)
    demo = ensure_demo_model(ctx)
    SOURCE.append(load_model(demo, ctx=ctx))
    test = load_dataset("builtin:micro-med-vqa", split="test")
    calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), args.samples, ctx=ctx)
    t0 = time.perf_counter()
    src = _answers(lambda ims, qs: answer_batch(SOURCE[0], ims, qs, max_new_tokens=16), test)
    result = {"test_questions": len(test), "calibration": calib.to_dict(), "source_seconds": round(time.perf_counter() - t0, 1),
              "load_avg": os.getloadavg(), "configs": {}}
    for name in args.configs.split(","):
        result["configs"][name] = run_config(name, demo, calib, test, src, ctx, args.work)
        print(name, json.dumps({k: v for k, v in result["configs"][name].items() if k != "components"}), flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
