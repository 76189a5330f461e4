"""Benchmark: one decode step of the traced vs the fused decoder at the full-size layer shape (TinyLlama-1.1B:
hidden 2048, 32 heads / 4 KV heads of 64, MLP 5632), with few layers and a small vocabulary so it builds in
seconds on a shared machine (issue 31: the full-size INT4 build takes tens of minutes and ~9 GB).

A random ``LlavaForConditionalGeneration`` with ``--layers`` such layers (fp32 Linear weights: the attention
and norm work this measures is the same as the INT4 decoder's; only the projections' kernels differ) is
exported both ways; each decoder runs one-token steps at ``--past`` cache slots (the dummy slot included) with
the runtime's session options (``ORT_ENABLE_BASIC`` and ``ALL``), median of ``--steps`` after a warm-up, and
ORT's profiler per op type (ms per step; inflated by the profiler, the shares hold).

    nice .venv/bin/python benchmarks/fused_decoder_layers.py --layers 2 --past 869

Writes ``benchmarks/results/fused_decoder_layers.json`` (merged under ``--key``).
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

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "fused_decoder_layers.json"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _model(layers: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=vocab - 1, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg).eval()


def _int4(model) -> None:
    """Round-to-nearest symmetric INT4 g128 for every language-model Linear and lm_head, installed as
    MatMulNBits modules (what the cpu-int4 decoder's projections are), with int8 compute (accuracy_level 4)."""
    import numpy as np

    from medlite.compress.int4.pack import pack_matmul_nbits
    from medlite.compress.int4.swap import install_matmul_nbits

    names = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"
             and (n.startswith("model.language_model") or n == "lm_head")]
    for name in names:
        w = model.get_submodule(name).weight.detach().numpy()
        g = w.reshape(w.shape[0], -1, 128)
        scale = np.abs(g).max(axis=2) / 7.0 + 1e-12
        q = np.clip(np.rint(g / scale[..., None]) + 8, 0, 15).astype(np.uint8).reshape(w.shape)
        packed = pack_matmul_nbits(q, scale, np.full(scale.shape, 8), bits=4, block_size=128)
        install_matmul_nbits(model, name, packed)


def _accuracy4(proto):
    from medlite.compress.int4.stage import accuracy_level_pass

    return accuracy_level_pass(4)(proto, None)


def _step(path: Path, past: int, steps: int, level: str, profile: bool, seq: int = 1) -> dict:
    import numpy as np
    import onnxruntime as ort

    from medlite.runtime.sessions import session_options

    opts = session_options(optimization=level)
    tmp = tempfile.mkdtemp()
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "p")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"inputs_embeds": rng.standard_normal((1, seq, 2048)).astype(np.float32),
            "attention_mask": np.ones((1, past + seq), np.int32),
            "position_ids": np.arange(past - 1, past - 1 + seq, dtype=np.int32)[None]}
    feed["attention_mask"][0, 0] = 0                     # the dummy slot
    for vi in sess.get_inputs():
        if vi.name.startswith("past_key_values"):
            feed[vi.name] = rng.standard_normal((1, 4, past, 64)).astype(np.float32)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    out = {"step_ms_median": round(statistics.median(times), 3)}
    if profile:
        ev = json.loads(Path(sess.end_profiling()).read_text())
        per: dict = {}
        for e in ev:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e["args"].get("op_name", "?")
                per[op] = per.get(op, 0.0) + e["dur"] / 1000.0 / (steps + 3)
        out["profiled_ms_per_step_by_op"] = dict(sorted(((k, round(v, 3)) for k, v in per.items()), key=lambda x: -x[1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--past", type=int, default=869)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens (past: the dummy slot)")
    ap.add_argument("--key", default=None)
    ap.add_argument("--int4", action="store_true", help="RTN INT4 g128 MatMulNBits projections, int8 compute")
    a = ap.parse_args()
    from medlite.export.files import write_onnx
    from medlite.export.fused_decoder import fused_decoder_onnx_from_model
    from medlite.export.graphs import decoder_onnx_from_model

    model = _model(a.layers, a.vocab)
    if a.int4:
        _int4(model)
    work = Path(tempfile.mkdtemp(prefix="medlite-fused-layers-"))
    paths = {}
    for form, fn in (("plain", decoder_onnx_from_model), ("fused", fused_decoder_onnx_from_model)):
        proto = fn(model, opset=17, metadata={}, tmp_root=work / f"tmp-{form}")
        if a.int4:
            proto = _accuracy4(proto)
        paths[form] = write_onnx(proto, work / f"{form}.onnx")[0]
    res: dict = {"layers": a.layers, "past_slots": a.past,
                 "shape": "hidden 2048, 32/4 heads of 64, MLP 5632, " + ("INT4 g128 int8 compute" if a.int4 else "fp32"),
                 "rounds": {}}
    for r in range(a.rounds):                       # interleaved: the machine is shared
        for form in ("plain", "fused"):
            for level in ("basic", "all"):
                res["rounds"].setdefault(f"{form}_{level}", []).append(
                    dict(_step(paths[form], a.past, a.steps, level, profile=False), loadavg=os.getloadavg()[0]))
    res["median_step_ms"] = {k: statistics.median(x["step_ms_median"] for x in v) for k, v in res["rounds"].items()}
    if a.prefill:
        pre: dict = {}
        for r in range(a.rounds):
            for form in ("plain", "fused"):
                pre.setdefault(form, []).append(_step(paths[form], 1, 2, "basic", False, seq=a.prefill)["step_ms_median"])
        res["prefill_ms_basic"] = {"tokens": a.prefill, "rounds": pre,
                                   "median": {f: statistics.median(v) for f, v in pre.items()}}
    res["profile_basic"] = {f: _step(paths[f], a.past, a.steps, "basic", profile=True) for f in ("plain", "fused")}
    res["command"] = "benchmarks/fused_decoder_layers.py " + " ".join(sys.argv[1:])
    res["note"] = "2 cores shared with other sessions: a busy machine (load average per run)"
    old = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    old[a.key or f"layers{a.layers}_past{a.past}{'_int4' if a.int4 else ''}"] = res
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    print(json.dumps(res["median_step_ms"]), json.dumps({f: list(v["profiled_ms_per_step_by_op"].items())[:6]
                                                         for f, v in res["profile_basic"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
