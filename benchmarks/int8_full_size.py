"""Benchmark: INT8 (SmoothQuant + static Q/DQ) on the full-size random TinyLLaVA-1.5B shape, CPU, this machine.

Steps:

1. ``bytes`` — INT8 vision + decoder graph bytes vs the fp16 export's, from the model shape
   (``medlite.checkpoints.random_ckpt.canonical_layout``, meta device, no weights): quantized
   Linear/Conv weights 1 byte + an fp32 scale and an int8 zero point per output channel; every other
   float tensor of >= 4096 elements fp16 (+ Cast), smaller ones fp32 (what ``qdq_onnx`` writes).
2. ``build`` — in a child process (peak RSS = ``ru_maxrss``): ``medlite demo random --preset
   tinyllava-1.5b`` (unless ``--ckpt`` exists) → load fp32 → calibration set of ``--samples``
   Micro Med-VQA train pairs (729 image tokens each) → ``apply_int8`` with the quantize options of
   ``--recipe`` (default ``recipes/xavier-agx-int8.yaml``; ``--set key=value`` overrides; sensitivity
   off unless ``--sensitivity``) → each graph traced again, the
   registered Q/DQ pass applied, written → file bytes; time per phase.
3. ``sensitivity-cost`` — in a child process, per graph on ``--heldout-rows`` held-out pairs: the held-out
   reference (vision: whole-VLM answer token), one re-quantization and one whole-graph measure; the pass
   time they imply at the stage's held-out size (``(layers + 1) × (re-quantize + measure)`` + reference,
   linear in rows; the fallback's own steps come on top).

Usage::

    nice .venv/bin/python benchmarks/int8_full_size.py --steps bytes
    nice .venv/bin/python benchmarks/int8_full_size.py --steps build --work /tmp/medlite-int8 --samples 128
    nice .venv/bin/python benchmarks/int8_full_size.py --steps sensitivity-cost --heldout-rows 8

Writes ``benchmarks/results/int8_full_size.json`` (merged with earlier steps' results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_child import keep_history, read_result, run_json_child, write_result  # noqa: E402
RESULT = ROOT / "benchmarks" / "results" / "int8_full_size.json"
FP16_MIN = 4096
_VISION_Q = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "linear_1", "linear_2", "patch_embedding")
_DECODER_Q = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _graph_of(name: str, used_layers: int):
    """Which exported graph a canonical tensor lands in (None: not in vision/decoder graphs)."""
    if name.startswith("model.vision_tower."):
        if ".head." in name:
            return None
        if ".encoder.layers." in name and int(name.split(".encoder.layers.")[1].split(".")[0]) >= used_layers:
            return None
        return "vision"
    if name.startswith("model.multi_modal_projector."):
        return "vision"
    if "embed_tokens" in name:
        return None     # embed graph / embed_tokens.bin, unchanged by INT8
    return "decoder"


def step_bytes() -> dict:
    """Analytic INT8 vs fp16 bytes of the vision and decoder graphs of the full-size shape."""
    import numpy as np

    from medlite.checkpoints.random_ckpt import canonical_layout, get_preset, preset_configs

    p = get_preset("tinyllava-1.5b")
    text, vision = preset_configs(p)
    used = vision.num_hidden_layers - 1          # feature layer -2: the last encoder layer is not in the graph
    out = {g: {"fp16": 0, "int8": 0, "int8_weights": 0} for g in ("vision", "decoder")}
    for name, shape in canonical_layout(text, vision):
        g = _graph_of(name, used)
        if g is None:
            continue
        n = int(np.prod(shape))
        out[g]["fp16"] += 2 * n
        quant = name.endswith(".weight") and len(shape) >= 2 and any(
            f".{k}." in name for k in (_VISION_Q if g == "vision" else _DECODER_Q))
        if quant:
            out[g]["int8"] += n + shape[0] * 5        # int8 weight + fp32 scale + int8 zero point per channel
            out[g]["int8_weights"] += n
        else:
            out[g]["int8"] += n * (2 if n >= FP16_MIN else 4)
    total16 = sum(v["fp16"] for v in out.values())
    total8 = sum(v["int8"] for v in out.values())
    return {"graphs": out, "fp16_bytes": total16, "int8_bytes": total8, "ratio": round(total8 / total16, 4),
            "goal_ratio": 0.55, "note": "lm_head fp16 (default); graph structure bytes (< 1 MB) not counted"}


CHILD = r"""
import json, resource, shutil, sys, time
from pathlib import Path
t = {}
t0 = time.perf_counter()
ckpt, samples, sens, work = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", Path(sys.argv[4])
qopts = json.loads(sys.argv[5])
from medlite.context import RunContext
from medlite.checkpoints import load_model
from medlite.memory import map_large_allocations
map_large_allocations()   # as `medlite build` does for its process
from medlite.calibration.calibset import build_calibration_set
from medlite.evaluation.vqa import load_dataset
from medlite.pipeline.contract import BuildState, PassContext
from medlite.recipes.options import QuantizeOptions
from medlite.compress.int8.stage import apply_int8
sys.path.insert(0, "benchmarks")
from rss_phases import PhaseRss
import medlite.compress.int8.stage as S, medlite.compress.int8.qdq_onnx as Q, medlite.compress.int8.smoothquant as SQ
import medlite.export.graphs as G
rss = PhaseRss().__enter__()
for owner, attr in ((SQ, "smooth_language_model"), (S, "_trace"), (Q, "calibrate_ranges"), (S, "quantized_proto"),
                    (G, "decoder_onnx_from_model"), (G, "vision_onnx_from_model")):
    rss.wrap(owner, attr)
rss.wrap(S, "_choose", lambda state, graph, *a, **k: f"int8 {graph}")
ctx = RunContext(cache_dir=work / "cache", quiet=True)
with rss.phase("load"):
    loaded = load_model(ckpt, ctx=ctx)   # float32 (the Q/DQ graphs are fp32-based)
t["load"] = time.perf_counter() - t0
cal = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), samples, ctx=ctx, cache=False)
state = BuildState(ctx=ctx, recipe=None, target=None, work=work, source=None, model=loaded, calibration=cal)
t1 = time.perf_counter()
res = apply_int8(state, 0, QuantizeOptions(**qopts))
t["smooth+calibrate+quantize"] = time.perf_counter() - t1
# the product's export (what `medlite build` runs): every graph traced again with the plan's Q/DQ pass
import medlite.export.api as E
rss.wrap(E, "_export_one", lambda name, *a, **k: f"export {name}")
for attr in ("_trace", "write_onnx", "_check_graph"):   # where inside one graph's export the peak is
    rss.wrap(E, attr)
rss.wrap(Q, "save_for_ort")
t2 = time.perf_counter()
shutil.rmtree(work / "out", ignore_errors=True)
files, export_error = {}, None
try:
    exp = E.export_onnx(loaded, work / "out", ctx=ctx, precision="fp16", plan=state.export_plan, pass_state=state)
    files = {g: sum(v["bytes"] for k, v in exp.files.items() if k.split(".")[0] == g) for g in ("vision", "decoder", "embed")}
except Exception as e:   # still report the memory and time measured up to here
    export_error = f"{type(e).__name__}: {str(e)[:600]}"
t["export"] = time.perf_counter() - t2
rss.__exit__()
print(json.dumps({"seconds": {k: round(v, 1) for k, v in t.items()}, "total_s": round(time.perf_counter() - t0, 1),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "file_bytes": files, "stage_bytes_before": res.bytes_before, "stage_bytes_after": res.bytes_after,
                  "summary": res.summary, "sensitivity": sens, "samples": samples, "export_error": export_error,
                  "quantize_options": qopts,
                  "stage_phases_s": dict(state.timings), "peak_rss_gb_by_phase": rss.to_dict()}))
"""


def recipe_quantize_options(recipe: Path, sets: list, sensitivity: bool) -> dict:
    """The quantize stage's options of ``recipe`` (what ``medlite build`` runs), ``sensitivity`` and
    ``--set key=value`` (YAML values) applied."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    q = dict(next(s["quantize"] for s in data["stages"] if "quantize" in s))
    q["sensitivity"] = sensitivity
    for kv in sets:
        k, _, v = kv.partition("=")
        q[k] = yaml.safe_load(v)
    return q


def step_build(work: Path, ckpt: Path, samples: int, qopts: dict) -> dict:
    """Checkpoint (if missing) and the INT8 build in a child process; its time and peak RSS."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medlite.cli", "demo", "random", "--preset", "tinyllava-1.5b",
                        "--out", str(ckpt)], check=True, cwd=ROOT)
        out["checkpoint_s"] = round(time.perf_counter() - t0, 1)
    out.update(run_json_child([ckpt, samples, "1" if qopts["sensitivity"] else "0", work, json.dumps(qopts)],
                              code=CHILD, what="build child"))
    return out


SENS_CHILD = r"""
import json, resource, shutil, sys, time
from pathlib import Path
ckpt, rows, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
from medlite.context import RunContext
from medlite.checkpoints import load_model
from medlite.memory import map_large_allocations
map_large_allocations()   # as `medlite build` does for its process
from medlite.calibration.calibset import build_calibration_set
from medlite.evaluation.vqa import load_dataset
from medlite.pipeline.contract import BuildState
from medlite.compress.int8 import qdq_onnx as Q
from medlite.compress.int8 import stage as S
ctx = RunContext(cache_dir=work / "cache", quiet=True)
loaded = load_model(ckpt, ctx=ctx)
cal = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), rows, ctx=ctx, cache=False)
state = BuildState(ctx=ctx, recipe=None, target=None, work=work, source=None, model=loaded, calibration=cal)
held = S._subset(list(cal.heldout), rows)
out = {"heldout_rows": len(held), "distinct_heldout_images": len({id(s.image_fn) for s in held}), "graphs": {}}
for g in ("vision", "decoder"):
    d, t = {}, time.perf_counter()
    tmp = work / "sens" / g
    proto = S._trace(state, g, work / "sens")
    targets = Q.quant_targets(proto, g)
    fp32 = Q.save_for_ort(proto, tmp / "fp32.onnx")
    del proto
    d["trace_s"] = time.perf_counter() - t
    t = time.perf_counter()
    Q.calibrate_ranges(fp32, S._feeds(state, g, list(cal.samples)[:rows]), tmp / "ranges.json", method="minmax",
                       work_dir=tmp, tensors=Q.activation_inputs(fp32, [x.node for x in targets]))
    d["calibrate_s_for_rows"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = S._heldout(state, g, fp32, held)
    d["heldout_reference_s"] = time.perf_counter() - t
    t = time.perf_counter()
    q = Q.save_for_ort(S.quantized_proto(fp32, tmp / "m" / "staged", tmp / "ranges.json", [x.node for x in targets],
                                         method="minmax"), tmp / "m" / "q_loadable.onnx")
    d["requantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    d["metric"] = ref.metric(q).to_dict()
    d["measure_s"] = time.perf_counter() - t
    d["layers"] = len(dict.fromkeys(x.layer for x in targets))
    out["graphs"][g] = d
    shutil.rmtree(tmp, ignore_errors=True)
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def step_sensitivity_cost(work: Path, ckpt: Path, rows: int) -> dict:
    """The sensitivity pass's unit costs on ``rows`` held-out pairs (one whole-graph measure per graph)
    and the pass time they imply at the stage's 128 held-out rows (cost is linear in rows)."""
    work.mkdir(parents=True, exist_ok=True)
    out = run_json_child([ckpt, rows, work], code=SENS_CHILD, what="sensitivity-cost child")
    from medlite.compress.int8.stage import MAX_HELDOUT

    scale = MAX_HELDOUT / max(out["heldout_rows"], 1)
    for g in out["graphs"].values():
        # a pass = the reference + (1 whole graph + 1 per layer) x (re-quantize + measure); the reference
        # and each measure are linear in the held-out rows, a re-quantization is not (fallback steps extra)
        g["pass_estimate_s_at_stage_rows"] = round(g["heldout_reference_s"] * scale + (g["layers"] + 1) * (
            g["requantize_s"] + g["measure_s"] * scale), 0)
    out["stage_heldout_rows"] = MAX_HELDOUT
    return out



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="bytes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medlite-int8"))
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--heldout-rows", type=int, default=8, help="sensitivity-cost: held-out pairs to time")
    ap.add_argument("--label", default=None, help="build: what this run is (the previous build moves to history.build)")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "xavier-agx-int8.yaml",
                    help="build: the recipe whose quantize options run (default: the INT8-everywhere recipe)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="build: override a quantize option")
    args = ap.parse_args(argv)
    result = read_result(RESULT)
    if "build_history" in result:      # the older layout: history under its own key
        result.setdefault("history", {}).setdefault("build", []).extend(result.pop("build_history"))
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "load_avg_at_start": os.getloadavg()}
    for step in args.steps.split(","):
        t0 = time.perf_counter()
        if step == "bytes":
            result["bytes"] = step_bytes()
        elif step == "build":
            keep_history(result, "build")
            result["build"] = step_build(args.work, args.ckpt or args.work / "ckpt", args.samples,
                                         recipe_quantize_options(args.recipe, args.set, args.sensitivity))
            result["build"]["label"] = args.label or f"{args.samples} pairs"
            result["build"]["load_avg_at_start"] = result["machine"]["load_avg_at_start"]
        elif step == "sensitivity-cost":
            result["sensitivity_cost"] = step_sensitivity_cost(args.work, args.ckpt or args.work / "ckpt",
                                                               args.heldout_rows)
        else:
            raise SystemExit(f"unknown step {step!r}: bytes | build | sensitivity-cost")
        result.setdefault("step_seconds", {})[step] = round(time.perf_counter() - t0, 1)
    write_result(RESULT, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
