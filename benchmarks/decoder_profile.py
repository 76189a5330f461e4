"""Benchmark: where one decode step of an artifact's decoder goes — ONNX Runtime's profiler per op type,
and the Python loop time per step in ``medlite.runtime`` (issue 31: "find where each decode step's time
goes first").

    nice .venv/bin/python benchmarks/decoder_profile.py ARTIFACT [ARTIFACT ...] [--past 869] [--steps 30]
        [--key demo_cpu_int4] [--out benchmarks/results/decoder_profile.json]

Per artifact:

* **op profile**: the decoder session opened exactly as ``OnnxVlm`` opens it (same options and
  optimisation level), ``enable_profiling`` on; ``--steps`` decode steps of one token at ``--past``
  cache slots (random cache contents: the cost does not depend on the values), after ``--warmup``
  steps; the profile's node events summed per op type and divided by the steps (ms per step). The
  profiler adds overhead per node, so absolute figures are inflated; the shares hold.
* **bare step**: the same step without the profiler (median ms of ``session.run``).
* **Python loop**: one real answer (built-in image, fixed question, ``--new`` tokens generated past
  the answer's end) through ``OnnxVlm.generate_ids``; the decoder calls are timed inside, and the
  rest of each step (sampling, embedding lookup, mask growth, stop-string checks, buffer binding
  outside ``run_with_iobinding``) is the Python loop time per step.

Results merge into ``--out`` under ``--key`` (one object per artifact), with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "decoder_profile.json"


def _session(folder: Path, profile_dir=None):
    """The decoder session as ``OnnxVlm.open`` makes it (quantized graphs at BASIC), optionally profiling."""
    import onnxruntime as ort

    from medlite.runtime.config import RuntimeConfig
    from medlite.runtime.sessions import session_options

    cfg = RuntimeConfig.load(folder)
    spec = cfg.graphs["decoder"]
    opts = session_options(optimization="basic" if spec.quantization else "all")
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "decoder")
    sess = ort.InferenceSession(str(folder / spec.file), sess_options=opts, providers=["CPUExecutionProvider"])
    return sess, cfg


def _feeds(cfg, past: int) -> dict:
    import numpy as np

    m = cfg.model
    rng = np.random.default_rng(0)
    dec = cfg.graphs["decoder"]
    dt = np.dtype(dec.input("inputs_embeds").dtype)
    kv = np.dtype(cfg.kv_cache["dtype"])
    feed = {"inputs_embeds": rng.standard_normal((1, 1, m["hidden_size"])).astype(dt),
            "attention_mask": np.ones((1, past + 1), np.int32), "position_ids": np.full((1, 1), past, np.int32)}
    for i in range(m["num_layers"]):
        for k in ("key", "value"):
            feed[cfg.past_name(i, k)] = rng.standard_normal((1, m["num_kv_heads"], past, m["head_dim"])).astype(kv)
    return feed


def op_profile(folder: Path, past: int, steps: int, warmup: int) -> dict:
    """ms per decode step by op type (profiler on) and the bare step time (profiler off)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess, cfg = _session(folder, tmp)
        feed = _feeds(cfg, past)
        for _ in range(warmup):
            sess.run(None, feed)
        # the profile holds every run since the session opened: count only the last `steps` runs
        for _ in range(steps):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-steps]["ts"] if len(runs) >= steps else 0
    per_op: dict[str, float] = {}
    nodes = 0
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000.0 / steps
    sess, _ = _session(folder)
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    nodes = sum(1 for _ in _graph_nodes(folder, cfg))
    top = dict(sorted(((k, round(v, 3)) for k, v in per_op.items()), key=lambda kv: -kv[1]))
    return {"past_slots": past, "steps": steps, "profiled_ms_per_step": round(sum(per_op.values()), 3),
            "ms_per_step_by_op": top, "bare_step_ms_median": round(statistics.median(times), 3),
            "graph_nodes": nodes}


def _graph_nodes(folder: Path, cfg):
    import onnx

    return onnx.load(str(folder / cfg.graphs["decoder"].file), load_external_data=False).graph.node


def python_loop(folder: Path, new_tokens: int) -> dict:
    """Decoder time vs the rest of each step of a real greedy answer through ``OnnxVlm``."""
    from medlite.imaging.builtin import builtin_images
    from medlite.runtime import OnnxVlm

    vlm = OnnxVlm.open(folder, providers=["CPUExecutionProvider"])
    image = builtin_images()[0].load()
    question = "Is there an abnormality in this image?"
    inner = vlm._decoder
    calls: list[float] = []

    def timed(x, mask, pos, past):
        t = time.perf_counter()
        out = inner(x, mask, pos, past)
        calls.append(time.perf_counter() - t)
        return out

    vlm._decoder = timed
    vlm.generate_ids([image], [question], max_new_tokens=4)     # warm-up
    calls.clear()
    steps: list[float] = []
    from medlite.runtime import decoding

    real = decoding.greedy_generate

    def stamped(run_decoder, embed_ids, first, **kw):
        stop = set()   # generate exactly new_tokens: no stop ids, no stop strings
        return real(run_decoder, embed_ids, first, max_new_tokens=new_tokens, stop_ids=stop,
                    suppress_ids=kw["suppress_ids"], is_stopped=lambda r, ids: (kw["is_stopped"](r, ids), False)[1],
                    on_step=lambda out: steps.append(time.perf_counter()))

    import medlite.runtime.vlm as vlm_mod

    vlm_mod.greedy_generate = stamped
    try:
        t0 = time.perf_counter()
        vlm.generate_ids([image], [question], max_new_tokens=new_tokens)
        total = time.perf_counter() - t0
    finally:
        vlm_mod.greedy_generate = real
    decode_steps = steps[-1] - steps[0]        # from the first token to the last: the decode steps
    n = len(steps) - 1
    decoder = sum(calls[1:])                   # calls[0] is the prefill
    return {"new_tokens": new_tokens, "prompt_tokens": len(vlm.prompt_ids(question)),
            "decode_ms_per_step": round(decode_steps / n * 1000, 3),
            "decoder_call_ms_per_step": round(decoder / n * 1000, 3),
            "python_loop_ms_per_step": round((decode_steps - decoder) / n * 1000, 3),
            "prefill_ms": round(calls[0] * 1000, 3), "total_s": round(total, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--past", type=int, default=0, help="cache slots of the profiled step (default: the prompt's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--new", type=int, default=32, help="tokens generated in the Python-loop measurement")
    ap.add_argument("--key", default="demo")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    results = {}
    for folder in args.artifacts:
        loop = python_loop(folder, args.new)
        past = args.past or loop["prompt_tokens"] + 1     # the dummy slot + the prompt
        prof = op_profile(folder, past, args.steps, args.warmup)
        results[str(folder)] = {"op_profile": prof, "python_loop": loop}
        print(json.dumps({str(folder): results[str(folder)]}), flush=True)   # one line: run_json_child reads it
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    old[args.key] = {"artifacts": results, "load_average": [round(x, 2) for x in os.getloadavg()],
                     "threads": os.environ.get("MEDLITE_ORT_THREADS", "physical cores"),
                     "command": " ".join(["benchmarks/decoder_profile.py"] + (argv or sys.argv[1:]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
