"""Benchmark: INT4 (GPTQ g128, MatMulNBits) on the full-size random TinyLLaVA-1.5B shape, CPU, this machine.

Steps (each heavy one in its own process, so peak RSS is per step):

1. ``bandwidth`` — this machine's memory bandwidth (numpy copy of a 1 GiB array, read + write bytes);
2. ``bytes`` — INT4 g128 decoder bytes vs the fp16 decoder, computed from the model shape with the
   packer's own byte formula (``medlite.compress.int4.rules.packed_bytes``) — no model needed;
3. ``build`` — checkpoint (``medlite demo random --preset tinyllava-1.5b``) → GPTQ g128 with
   ``--samples`` calibration pairs (729 image tokens each) → fp32 export with MatMulNBits decoder;
   time, peak RSS per phase (``benchmarks/rss_phases.py``) and seconds of the layer-input capture, the
   layer loop and GPTQ's per-layer quantization (goal <= 2x llm-compressor's GPTQ alone);
4. ``gptq-alone`` — llm-compressor's own ``oneshot`` GPTQ (sequential pipeline over
   ``LlamaDecoderLayer``) on the same checkpoint, the same ``--samples`` pairs in the same batches
   (through HF Llava's own forward: 729 image tokens each) and the same modifiers (scheme, exact
   language-model + lm_head targets, actorder) as the build's quantize stage; time and peak RSS in a
   child process, so the build's ratio is measured at the same sample count;
5. ``speed`` — ``medlite bench --ignore-eos --max-new-tokens 64`` on the INT4 export, the fp32 export
   and the checkpoint in PyTorch eager fp32, same image and prompt; decode tokens/s, TTFT, and
   bandwidth efficiency = tokens/s x decoder weight bytes ÷ measured bandwidth.

Usage::

    nice .venv/bin/python benchmarks/int4_full_size.py --work /tmp/medlite-int4 --steps bandwidth,bytes
    nice .venv/bin/python benchmarks/int4_full_size.py --work /tmp/medlite-int4 --steps build,speed --samples 16
    # full-size runs are serialized on the shared machine (each holds 7-16 GB):
    flock /tmp/medlite-fullsize.lock nice .venv/bin/python benchmarks/int4_full_size.py --work /tmp/medlite-int4 \
        --steps gptq-alone --samples 8
    flock /tmp/medlite-fullsize.lock nice .venv/bin/python benchmarks/int4_full_size.py \
        --work /tmp/medlite-int4-build --ckpt /tmp/medlite-int4/ckpt --steps build --samples 8
    # speed only: a fast round-to-nearest export with the same MatMulNBits graph as GPTQ's
    nice .venv/bin/python benchmarks/int4_full_size.py --steps build,speed --algorithm rtn --lm-head int4 --runs 1
    nice .venv/bin/python benchmarks/int4_full_size.py --steps build,speed --algorithm rtn --lm-head int4 --runs 1 \
        --int4-compute int8 --speed-key speed_int8_compute

Writes ``benchmarks/results/int4_full_size.json`` (merged with earlier steps' results).
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
RESULT = ROOT / "benchmarks" / "results" / "int4_full_size.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_child import keep_history, read_result, run_json_child, write_result  # noqa: E402
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_kv_heads": 4,
         "head_dim": 64, "num_layers": 22, "vocab_size": 32000}

# shared by the child processes: imports, the checkpoint in fp32 and the calibration set, each a phase
CHILD_PRELUDE = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, "benchmarks")
from rss_phases import PhaseRss
from medlite.calibration.calibset import build_calibration_set
from medlite.checkpoints import load_model
from medlite.context import RunContext
from medlite.evaluation.vqa import load_dataset
from medlite.recipes.options import QuantizeOptions


def load_and_calibration(rss, ckpt, samples):
    ctx = RunContext(quiet=True)
    with rss.phase("load"):
        loaded = load_model(ckpt, ctx=ctx, dtype=torch.float32)
    with rss.phase("calibration set"):
        calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), samples, ctx=ctx,
                                      cache=False)
    return ctx, loaded, calib


SECONDS = {}


def timed(owner, attr, key):
    # seconds spent in owner.attr (summed over calls) -> SECONDS[key]
    fn = getattr(owner, attr)

    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SECONDS[key] = SECONDS.get(key, 0.0) + time.perf_counter() - t

    setattr(owner, attr, wrapped)


from llmcompressor.core import LifecycleCallbacks
# where GPTQ quantizes each layer (the sample-count-independent part of its time)
timed(LifecycleCallbacks, "sequential_epoch_end", "sequential_epoch_end_s")
"""

BUILD = CHILD_PRELUDE + r"""
from medlite.pipeline.contract import BuildState
from medlite.compress.int4.stage import apply_w4a16
from medlite.memory import map_large_allocations
map_large_allocations()   # as `medlite build` does for its process
from medlite.export import export_onnx
import medlite.compress.int4.llmc as L, medlite.compress.int4.stage as S, medlite.export.api as A
ckpt, out, samples, head, algorithm, compute = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
rss = PhaseRss().__enter__()
for owner, attr in ((L, "_layer_inputs"), (L, "_run_sequential"), (L, "record_from_module"), (S, "pack_record"),
                    (L, "strip_quantization"), (A, "decoder_onnx_from_model"), (A, "vision_onnx_from_model"),
                    (A, "write_onnx"), (A, "_check_graph")):
    rss.wrap(owner, attr)
rss.wrap(A, "_export_one", lambda name, *a, **k: f"export {name}")
timed(L, "_layer_inputs", "layer_inputs_s")
timed(L, "_run_sequential", "run_sequential_s")
t0 = time.perf_counter()
ctx, loaded, calib = load_and_calibration(rss, ckpt, samples)
t1 = time.perf_counter()
state = BuildState(ctx=ctx, recipe=None, target=None, work=None, source=None, model=loaded, calibration=calib)
with rss.phase("apply_w4a16"):
    res = apply_w4a16(state, 0, QuantizeOptions(vision="fp16", llm="w4a16", lm_head=head, algorithm=algorithm,
                                                int4_compute=compute, group_size=128,
                                                symmetric=algorithm != "awq"))
t2 = time.perf_counter()
with rss.phase("export_onnx"):
    export_onnx(loaded, out, ctx=ctx, precision="fp32", allow_trt_issues=True, plan=state.export_plan)
t3 = time.perf_counter()
rss.__exit__()
print(json.dumps({"act_order": QuantizeOptions().act_order, "load_s": t1 - t0, "gptq_s": t2 - t1, "quantize_s": t2 - t1,
                  "export_s": t3 - t2,
                  "total_s": t3 - t0, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_rss_gb_by_phase": rss.to_dict(), "summary": res.summary, "seconds": SECONDS}))
"""

# llm-compressor's own GPTQ (oneshot, sequential pipeline over LlamaDecoderLayer) on the same model,
# the same calibration pairs in the same batch (729 image tokens each, through HF Llava's own forward:
# vision tower -> projector -> splice) and the same modifiers (scheme, targets: the language model's
# Linear layers and lm_head by exact name, actorder) as the build's quantize stage.
GPTQ_ALONE = CHILD_PRELUDE + r"""
from torch.utils.data import DataLoader
from medlite.calibration.forward import ForwardLoop
from medlite.compress.int4.llmc import _modifiers, language_linear_names, untie_lm_head
from medlite.compress.int4.stage import llmc_options
ckpt, samples, head, group = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rss = PhaseRss().__enter__()
t0 = time.perf_counter()
ctx, loaded, calib = load_and_calibration(rss, ckpt, samples)
with rss.phase("calibration batch"):
    batches = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids,
                "pixel_values": b.pixel_values} for b in ForwardLoop(loaded, calib.samples, batch_size=8).batches()]
opts = llmc_options(QuantizeOptions(vision="fp16", llm="w4a16", lm_head=head, algorithm="gptq", group_size=group,
                                    symmetric=True))
model = loaded.model
import tempfile
cfg_dir = tempfile.mkdtemp(prefix="medlite-gptq-alone-")
model.config.save_pretrained(cfg_dir)     # oneshot's validate_model re-reads the (canonical Llava) config
model.config._name_or_path = cfg_dir
head_bits = {"int4": 4, "int8": 8}.get(head)
if head_bits:
    untie_lm_head(model)
by_bits = {4: language_linear_names(model, lm_head=False)}
if head_bits:
    by_bits.setdefault(head_bits, []).append("lm_head")
from llmcompressor import oneshot
t1 = time.perf_counter()
with rss.phase("oneshot"):
    oneshot(model=model, processor=loaded.tokenizer, dataset=DataLoader(batches, batch_size=None),
            recipe=_modifiers(by_bits, opts), pipeline="sequential", sequential_targets=["LlamaDecoderLayer"],
            num_calibration_samples=len(calib.samples))
t2 = time.perf_counter()
rss.__exit__()
quantized = sum(1 for m in model.modules() if hasattr(m, "weight_scale"))
print(json.dumps({"prep_s": t1 - t0, "gptq_alone_s": t2 - t1, "total_s": t2 - t0, "quantized_layers": quantized,
                  "act_order": opts.act_order, "calibration_samples": len(calib.samples),
                  "tokens_per_sample": int(batches[0]["input_ids"].shape[1]),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_rss_gb_by_phase": rss.to_dict(), "seconds": SECONDS}))
"""


def bandwidth_gbs(size: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-``repeats`` numpy copy bandwidth in GB/s (bytes read + bytes written)."""
    import numpy as np

    a = np.ones(size // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def decoder_bytes(head: str) -> dict:
    """fp16 vs INT4 g128 decoder weight bytes of the full-size shape (norms and biases ignored: < 0.1 %)."""
    from medlite.compress.int4.rules import packed_bytes

    s = SHAPE
    h, i, kv = s["hidden_size"], s["intermediate_size"], s["num_kv_heads"] * s["head_dim"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    linear = sum(k * n for k, n in shapes) * s["num_layers"]
    head_params = h * s["vocab_size"]
    fp16 = 2 * (linear + head_params)
    int4 = s["num_layers"] * sum(packed_bytes(k, n, 128) for k, n in shapes)
    head_bytes = {"fp16": 2 * head_params, "fp32": 4 * head_params, "int8": packed_bytes(h, s["vocab_size"], 128, 8),
                  "int4": packed_bytes(h, s["vocab_size"], 128, 4)}[head]
    return {"fp16_bytes": fp16, "int4_bytes": int4 + head_bytes, "lm_head": head,
            "ratio": (int4 + head_bytes) / fp16}


def _child(args: list, *, python_code: str = "") -> dict:
    return run_json_child(args, code=python_code, errors="record")


def _bench(model: Path, runs: int) -> dict:
    return _child(["-m", "medlite.cli", "bench", "--model", str(model), "--json", "--ignore-eos",
                   "--max-new-tokens", "64", "--runs", str(runs), "--warmup", "1", "--no-write"])


def _git_head() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip()


def _ratios(build: dict, alone: dict) -> dict:
    """The build against llm-compressor's GPTQ alone, at the same sample count (None when they differ)."""
    if "error" in build or "error" in alone or build.get("samples") != alone.get("samples"):
        return {"note": "runs missing, failed or at different sample counts"}
    return {"samples": build["samples"],
            "time_ratio_quantize_export": round((build["gptq_s"] + build["export_s"]) / alone["gptq_alone_s"], 2),
            "time_ratio_total": round(build["total_s"] / alone["total_s"], 2),
            "peak_rss_gb": {"build": round(build["peak_rss_bytes"] / 1e9, 2),
                            "gptq_alone": round(alone["peak_rss_bytes"] / 1e9, 2)},
            "goals": {"time_ratio": 2.0, "peak_rss_gb": 9.2}}


def step_speed(a, res: dict, ckpt: Path, int4: Path, fp32: Path) -> dict:
    """``medlite bench`` on the INT4 export, the fp32 export (made when missing) and the checkpoint."""
    if not (fp32 / "decoder.onnx").is_file():
        # the export prints its own progress, not JSON: run it plainly
        subprocess.run([sys.executable, "-m", "medlite.cli", "export", "--model", str(ckpt), "--out", str(fp32),
                        "--precision", "fp32"], cwd=ROOT, check=True)
    speed = {"int4_ort": _bench(int4, a.runs), "fp32_ort": _bench(fp32, a.runs), "fp32_torch": _bench(ckpt, a.runs)}
    bw = res.get("bandwidth_gbs") or bandwidth_gbs()
    for name, folder in (("int4_ort", int4), ("fp32_ort", fp32)):
        wbytes = sum(p.stat().st_size for p in folder.glob("decoder.onnx*"))
        tps = speed[name].get("decode_tokens_per_s")
        if tps:
            speed[name]["decoder_weight_bytes"] = wbytes
            speed[name]["bandwidth_efficiency"] = tps * wbytes / (bw * 1e9)
    speed["int4_export"] = json.loads((int4 / "medlite_runtime.json").read_text()).get("graphs", {}).get(
        "decoder", {}).get("quantization", {})
    speed["ratios"] = {k: round(speed["int4_ort"]["decode_tokens_per_s"] / speed[k]["decode_tokens_per_s"], 2)
                       for k in ("fp32_torch", "fp32_ort")
                       if speed["int4_ort"].get("decode_tokens_per_s") and speed[k].get("decode_tokens_per_s")}
    speed["loadavg_after"] = list(os.getloadavg())
    return speed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/medlite-int4")
    ap.add_argument("--steps", default="bandwidth,bytes",
                    help="comma list of bandwidth,bytes,build,gptq-alone,speed")
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: WORK/ckpt, created when missing)")
    ap.add_argument("--group-size", type=int, default=128, help="gptq-alone: group size (the build uses 128)")
    ap.add_argument("--samples", type=int, default=128, help="calibration pairs for the GPTQ build")
    ap.add_argument("--lm-head", default="int8", choices=["fp16", "fp32", "int8", "int4"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--int4-compute", default="fp32", choices=["fp32", "int8"],
                    help="build: MatMulNBits compute type (QuantizeOptions.int4_compute; int8 = accuracy_level 4)")
    ap.add_argument("--speed-key", default="speed", help="results key of the speed step")
    ap.add_argument("--build-key", default=None,
                    help="results key of the build step (default: build[_ALGORITHM][_COMPUTE]; the GPTQ-alone "
                         "ratio is computed from 'build' only)")
    ap.add_argument("--algorithm", default="gptq", choices=["gptq", "rtn", "awq"],
                    help="build: rtn makes a speed-only export fast (same MatMulNBits graph as GPTQ's: "
                         "ops, bits, block size and initializer shapes; no calibration); awq runs asymmetric "
                         "(its usual form), to time it")
    a = ap.parse_args()
    work, steps = Path(a.work), set(a.steps.split(","))
    work.mkdir(parents=True, exist_ok=True)
    res = read_result(RESULT)
    res["machine"] = {"cpus": os.cpu_count(), "machine": platform.machine(), "loadavg": list(os.getloadavg()),
                      "note": "2 cores shared with other sessions: figures are from a busy machine"}
    if "bandwidth" in steps:
        res["bandwidth_gbs"] = bandwidth_gbs()
    if "bytes" in steps:
        res["bytes"] = {h: decoder_bytes(h) for h in ("fp16", "int8", "int4")}
    ckpt, int4, fp32 = Path(a.ckpt) if a.ckpt else work / "ckpt", work / "onnx-int4", work / "onnx-fp32"
    if steps & {"build", "gptq-alone"} and not (ckpt / "config.json").is_file():
        res["create_checkpoint"] = _child(["-m", "medlite.cli", "demo", "random", "--preset", "tinyllava-1.5b",
                                           "--format", "legacy", "--out", str(ckpt)])
    if "build" in steps:
        key = "build" if a.algorithm == "gptq" else f"build_{a.algorithm}"
        key += "" if a.int4_compute == "fp32" else f"_{a.int4_compute}_compute"
        key = a.build_key or key
        keep_history(res, key)
        res[key] = _child([str(ckpt), str(int4), str(a.samples), a.lm_head, a.algorithm, a.int4_compute],
                          python_code=BUILD)
        res[key].update(samples=a.samples, lm_head=a.lm_head, algorithm=a.algorithm, int4_compute=a.int4_compute,
                        loadavg_after=list(os.getloadavg()), code=_git_head())
    if "gptq-alone" in steps:
        keep_history(res, "gptq_alone")
        res["gptq_alone"] = _child([str(ckpt), str(a.samples), a.lm_head, str(a.group_size)], python_code=GPTQ_ALONE)
        res["gptq_alone"].update(samples=a.samples, lm_head=a.lm_head, group_size=a.group_size,
                                 loadavg_after=list(os.getloadavg()), code=_git_head())
    if "build" in res and "gptq_alone" in res:
        res["build_vs_gptq_alone"] = _ratios(res["build"], res["gptq_alone"])
    if "speed" in steps:
        res[a.speed_key] = step_speed(a, res, ckpt, int4, fp32)
    write_result(RESULT, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
