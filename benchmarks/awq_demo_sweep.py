"""AWQ W4A16 settings on the demo model, compared on the calibration set's held-out slice (issue 14).

Selection data only: the calibration set's held-out slice (train-split images never used to
calibrate; ``build_calibration_set(train, 128).heldout``). The test split is the gate and is never
read here. Every variant is quantized from the same demo model with the same 128 calibration pairs,
exported (decoder MatMulNBits, fp32 elsewhere) and run on ONNX Runtime CPU — the path the test
measures — and compared with the fp32 export's first-token logits:

- ``kl``: mean first-token KL(fp32 ‖ quantized) over the closed held-out questions;
- ``kl_flip``: the same over the 10 % of those questions with the smallest fp32 top-2 first-token
  logit margin (where an answer can flip; a selection metric only, fixed before any run);
- ``top1``: first-token argmax agreement with fp32.

Round-to-nearest baselines are onnxruntime's ``MatMulNBitsQuantizer`` on the fp32 decoder export
(symmetric and asymmetric), lm_head included as in every llm-compressor variant here (int4).

Usage::

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/awq_demo_sweep.py awq_asym rtn_ort_sym ...
    (no names: list the variants)

Appends one JSON line per variant to benchmarks/results/awq_demo_sweep.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "awq_demo_sweep.jsonl"
CALIB = 128
GROUP = 32
FLIP_FRACTION = 0.10

IMATRIX = {"observer": "imatrix_mse", "observer_kwargs": {"norm": 2.0}}
# name -> LlmcOptions fields (algorithm, symmetric, extra, observer...) or {"ort": symmetric}
VARIANTS = {
    "awq_asym": {"algorithm": "awq", "symmetric": False},
    "awq_asym_clip": {"algorithm": "awq", "symmetric": False, "awq_clip": True},
    # llm-compressor's own grid options: ratio grid without the duo (activation/weight) scaling, or half and half
    "awq_asym_noduo": {"algorithm": "awq", "symmetric": False, "extra": {"duo_scaling": False}},
    "awq_asym_duoboth": {"algorithm": "awq", "symmetric": False, "extra": {"duo_scaling": "both"}},
    # one mapping kind only (the others round-to-nearest): which of AWQ's mappings moves the held-out KL
    "awq_asym_only_qkv": {"algorithm": "awq", "symmetric": False, "awq_only": "input_layernorm"},
    "awq_asym_only_gateup": {"algorithm": "awq", "symmetric": False, "awq_only": "post_attention_layernorm"},
    "awq_asym_only_down": {"algorithm": "awq", "symmetric": False, "awq_only": "up_proj"},
    "awq_asym_imatrix": {"algorithm": "awq", "symmetric": False, **IMATRIX},
    "awq_asym_imatrix_scaled": {"algorithm": "awq", "symmetric": False, **IMATRIX, "imatrix_scaled": True},
    "rtn_asym": {"algorithm": "rtn", "symmetric": False},
    "rtn_asym_imatrix": {"algorithm": "rtn", "symmetric": False, **IMATRIX},
    "gptq_asym": {"algorithm": "gptq", "symmetric": False},
    "rtn_ort_sym": {"ort": True},
    "rtn_ort_asym": {"ort": False},
}


def _setup(tmp: Path, seed: int, n_calib: int):
    from medlite.calibration.calibset import build_calibration_set
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset
    from medlite.export import export_onnx

    ctx = RunContext(quiet=True)
    path = ensure_demo_model(ctx)
    calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), n_calib, seed=seed, ctx=ctx,
                                  cache=False)
    held = [s for s in calib.heldout if s.answer_type == "closed"]
    src = tmp / "src"
    export_onnx(load_model(path, ctx=ctx), src, ctx=ctx, precision="fp32")
    return ctx, path, calib, held, src


def _weights_sha(path: Path) -> str:
    """Which demo-model build ran (the cache key does not tell builds of one key apart): the weights'
    sha256 the build recorded in its card."""
    from medlite.demo.model import MARKER

    card = json.loads((path / MARKER).read_text())
    return card["heldout"]["model"]["source"]["files"]["model.safetensors"][:16]


def first_token_logits(folder: Path, samples: list) -> np.ndarray:
    """First-token logits on ONNX Runtime CPU, each image encoded once per batch."""
    from medlite.pipeline.references import row_batches, run_batch
    from medlite.runtime import OnnxVlm

    vlm = OnnxVlm.open(folder, providers=["CPUExecutionProvider"])
    where = {id(s): i for i, s in enumerate(samples)}
    out = [None] * len(samples)
    for batch in row_batches(samples, 16):
        _, lg, _ = run_batch(vlm, batch, max_new_tokens=1)
        for (_, s), row in zip(batch, lg):
            out[where[id(s)]] = row
    return np.stack(out)


def _ort_rtn(src: Path, out: Path, symmetric: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    shutil.copytree(src, out, dirs_exist_ok=True)
    q = MatMulNBitsQuantizer(onnx.load(str(src / "decoder.onnx")), block_size=GROUP, is_symmetric=symmetric)
    q.process()
    q.model.save_model_to_file(str(out / "decoder.onnx"), use_external_data_format=False)


@contextlib.contextmanager
def _imatrix_in_awq_domain(enabled: bool):
    """Experiment: divide each balance layer's imatrix importance E[x²] by AWQ's scale² s².

    AWQ multiplies the balance layers' input columns by s and divides their inputs by s, so the
    error the clip search should weigh is E[(x/s)²]·(s·w - q)², as AutoAWQ's auto_clip sees it
    (its apply_scale divides the cached input features by the scales before clipping). The imatrix
    observer collected E[x²] before the scaling.
    """
    from unittest import mock

    from llmcompressor.modifiers.transform.awq import AWQModifier

    if not enabled:
        yield
        return
    original = AWQModifier._compute_best_scale

    def wrapped(self, mapping, *a, **k):
        scales = original(self, mapping, *a, **k)
        for layer in mapping.balance_layers:
            obs = getattr(layer, "weight_observer", None)
            if getattr(obs, "_imatrix_sum", None) is not None:
                obs._imatrix_sum.div_(scales.to(obs._imatrix_sum).pow(2))
        return scales

    with mock.patch.object(AWQModifier, "_compute_best_scale", wrapped):
        yield


@contextlib.contextmanager
def _only_mapping(smooth: str | None):
    """Experiment: AWQ with only the mapping whose smooth layer is ``smooth`` (None: all of them)."""
    from unittest import mock

    from medlite.compress.int4 import llmc

    if smooth is None:
        yield
        return
    every = llmc._awq_mappings()
    kept = [m for m in every if m.smooth_layer.endswith("*" + smooth + "(\\.inner)?$")]
    assert len(kept) == 1, [m.smooth_layer for m in every]
    with mock.patch.object(llmc, "_awq_mappings", lambda *_: kept):
        yield


def _llmc(ctx, path: Path, calib, out: Path, spec: dict) -> None:
    from medlite.checkpoints import load_model
    from medlite.pipeline.contract import ExportPlan
    from medlite.calibration.forward import ForwardLoop
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model
    from medlite.compress.int4.stage import pack_records
    from medlite.compress.int4.swap import matmul_nbits_swap
    from medlite.export import export_onnx

    loaded = load_model(path, ctx=ctx)
    fields = {k: v for k, v in spec.items() if k in LlmcOptions.__dataclass_fields__}
    opts = LlmcOptions(group_size=GROUP, lm_head="int4", act_order=True, **fields)
    with _imatrix_in_awq_domain(spec.get("imatrix_scaled", False)), _only_mapping(spec.get("awq_only")):
        records = quantize_language_model(loaded.model, ForwardLoop(loaded, calib.samples, ctx=ctx), opts, ctx=None)
    plan = ExportPlan()
    plan.graph("decoder").swaps.append(("matmul_nbits", matmul_nbits_swap(pack_records(records))))
    export_onnx(loaded, out, ctx=ctx, precision="fp32", allow_trt_issues=True, plan=plan)


def _metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    from medlite.checks import kl_divergence

    kl = np.array([kl_divergence(p, q) for p, q in zip(ref, got)])
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flip = np.argsort(margin)[:max(1, int(round(FLIP_FRACTION * len(ref))))]
    return {"n": len(ref), "kl": float(kl.mean()), "kl_flip": float(kl[flip].mean()), "n_flip": len(flip),
            "top1": float(np.mean(ref.argmax(1) == got.argmax(1))),
            "top1_flip": float(np.mean(ref[flip].argmax(1) == got[flip].argmax(1)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", help=f"any of: {', '.join(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0, help="calibration set seed (which images are held out)")
    ap.add_argument("--calib", type=int, default=CALIB, help="calibration pairs")
    args = ap.parse_args(argv)
    if not args.variants:
        print("\n".join(f"{k}: {v}" for k, v in VARIANTS.items()))
        return 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ctx, path, calib, held, src = _setup(tmp, args.seed, args.calib)
        ref = first_token_logits(src, held)
        for name in args.variants:
            spec, t0 = VARIANTS[name], time.time()
            out = tmp / name
            if "ort" in spec:
                _ort_rtn(src, out, spec["ort"])
            else:
                _llmc(ctx, path, calib, out, spec)
            row = {"variant": name, "spec": spec, "group_size": GROUP, "calibration_pairs": len(calib.samples),
                   "seed": args.seed, "demo_weights": _weights_sha(path),
                   **_metrics(ref, first_token_logits(out, held)), "seconds": round(time.time() - t0, 1),
                   "load": os.getloadavg()[0]}
            print(json.dumps(row), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
