"""Acceptance on the demo model's held-out split: GPTQ / AWQ W4A16 as MatMulNBits vs the fp32 source.

Gates (issue 14): GPTQ g32 — agreement >= 99.5 %, closed-accuracy drop <= 0.5 points; GPTQ g128 —
agreement >= 99 %; and each one's mean first-token KL against the source <= that of round-to-nearest
(RTN: onnxruntime's ``MatMulNBitsQuantizer`` on the fp32 decoder export) at the same group size and the
same symmetry. AWQ g32 (asymmetric): the floor of issue 28 — agreement >= 99 %, drop <= 1 point, KL <=
2.5x RTN's (``AWQ_FLOOR`` and the comment above it). Like with like: asymmetric AWQ against asymmetric RTN, symmetric
GPTQ against symmetric RTN, measured here. Everything runs on ONNX Runtime CPU; calibration uses
train-split pairs only (held-out questions are never seen by the quantizer). lm_head is INT4 in every variant, as in the
RTN baseline (its 15 MatMulNBits nodes include lm_head).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("medlite.demo.model", reason="the demo model module has not landed yet")

CALIB_SAMPLES = 128


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from medlite.calibration.calibset import build_calibration_set
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.evaluation.vqa import load_dataset
    from medlite.export import export_onnx

    ctx = RunContext(quiet=True)
    path = ensure_demo_model(ctx)
    calib = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), CALIB_SAMPLES, ctx=ctx,
                                  cache=False)
    heldout = load_dataset("builtin:micro-med-vqa", split="test")
    src = tmp_path_factory.mktemp("src")
    export_onnx(load_model(path, ctx=ctx), src, ctx=ctx, precision="fp32")
    return {"ctx": ctx, "path": path, "calib": calib, "heldout": heldout, "src": src, "tmp": tmp_path_factory,
            "ref": _run(src, heldout)}


def _run(folder, samples):
    """(answers, first-token logits) of every sample on ONNX Runtime CPU (each image encoded once)."""
    from medlite.pipeline.references import answers_and_logits
    from medlite.runtime import OnnxVlm

    return answers_and_logits(OnnxVlm.open(folder, providers=["CPUExecutionProvider"]), samples)


def _metrics(demo, out):
    from medlite.checks import agreement, kl_divergence
    from medlite.evaluation.scoring import closed_correct

    (ra, rl), (ca, cl) = demo["ref"], out
    closed = [i for i, s in enumerate(demo["heldout"]) if s.answer_type == "closed"]
    acc = lambda ans: 100.0 * np.mean([closed_correct(ans[i], demo["heldout"][i].answer) for i in closed])  # noqa: E731
    return {"agreement": agreement(ra, ca), "drop": acc(ra) - acc(ca),
            "kl": float(np.mean([kl_divergence(p, q) for p, q in zip(rl, cl)]))}


def _w4a16(demo, algorithm, group, symmetric):
    from types import SimpleNamespace

    from medlite.pipeline.contract import BuildState
    from medlite.checkpoints import load_model
    from medlite.compress.int4.stage import apply_w4a16
    from medlite.export import export_onnx

    ctx = demo["ctx"]
    loaded = load_model(demo["path"], ctx=ctx)
    state = BuildState(ctx=ctx, recipe=None, target=None, work=None, source=None, model=loaded,
                       calibration=demo["calib"])
    apply_w4a16(state, 0, SimpleNamespace(vision="fp16", llm="w4a16", lm_head="int4", algorithm=algorithm,
                                          group_size=group, symmetric=symmetric, act_order=True, samples=None))
    out = demo["tmp"].mktemp(f"{algorithm}{group}")
    export_onnx(loaded, out, ctx=ctx, precision="fp32", allow_trt_issues=True, plan=state.export_plan)
    return _metrics(demo, _run(out, demo["heldout"]))


def _rtn(demo, group, symmetric):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = demo["tmp"].mktemp(f"rtn{group}{'sym' if symmetric else 'asym'}")
    shutil.copytree(demo["src"], out, dirs_exist_ok=True)
    q = MatMulNBitsQuantizer(onnx.load(str(demo["src"] / "decoder.onnx")), block_size=group, is_symmetric=symmetric)
    q.process()
    q.model.save_model_to_file(str(out / "decoder.onnx"), use_external_data_format=False)
    return _metrics(demo, _run(out, demo["heldout"]))


# AWQ runs asymmetric, its canonical form (AutoAWQ zero_point=True; llm-compressor's own AWQ example uses
# W4A16_ASYM): compressed-tensors' symmetric int4 grid (scale = max|w| / 7.5, q in [-8, 7]) clips each
# group's largest positive weight, and AWQ, which only rescales channels, inherits that error. Chosen on
# the calibration held-out slice (docs/quantization-int4.md, benchmarks/awq_demo_sweep.py). Asymmetric AWQ
# g32's outcome depends on which demo model it runs on. The demo model's cache key does not capture
# everything its weights depend on: two machines built different weights under the same key
# 18dac00a059e726d (held-out accuracy 0.8625 on the earlier one, 0.8646 on the AMX-capable Xeon of
# 2026-12-02). On the first, AWQ g32 missed the gate: agreement 99.38 %, drop 0.63 points, KL 2.72e-4 vs
# asymmetric round-to-nearest's 1.43e-4; on the second it meets it: agreement 100 %, drop 0, KL 1.60e-4
# vs RTN's 2.35e-4. A third build (same machine, torch kernels pinned to AVX2, 0.8542; docs/demo-model.md):
# agreement 99.17 %, drop 0, KL 9.8e-4 vs RTN's 1.04e-3 — and there GPTQ g32 also lands one answer short
# (99.375 %) while its KL is 0.06x RTN's. On the held-out slice AWQ's KL is 0.6-1.5x RTN's depending on
# which 128 pairs calibrate it (docs/quantization-int4.md). AWQ's KL advantage over RTN is not robust
# (0.68-1.9x over three builds): AWQ only rescales input channels, and this model has few salient ones to
# protect (test_awq_salient.py shows AWQ removing such damage where it exists; that test proves AWQ's
# benefit). So the AWQ case asserts a floor that every measured build clears with room and a broken AWQ
# does not (symmetric AWQ, the earlier configuration: KL 4.5x RTN's, agreement 98.1 %); the issue's
# 99.5 % gate is not asserted for it, and it is never an expected failure: a gate that is only reported
# cannot fail (issue 28).
AWQ_FLOOR = {"agreement": 0.99, "drop": 1.0, "kl_vs_rtn": 2.5}


@pytest.mark.parametrize("algorithm,group,symmetric,min_agree,max_drop,kl_vs_rtn", [
    ("gptq", 32, True, 0.995, 0.5, 1.0),
    ("awq", 32, False, AWQ_FLOOR["agreement"], AWQ_FLOOR["drop"], AWQ_FLOOR["kl_vs_rtn"]),
    ("gptq", 128, True, 0.99, None, 1.0)])
def test_w4a16_gates_and_no_worse_than_round_to_nearest(demo, algorithm, group, symmetric, min_agree, max_drop,
                                                        kl_vs_rtn):
    ours, rtn = _w4a16(demo, algorithm, group, symmetric), _rtn(demo, group, symmetric)
    kind = "sym" if symmetric else "asym"
    print(f"{algorithm} g{group} {kind}: {ours}; RTN g{group} {kind}: {rtn}")
    assert ours["agreement"] >= min_agree, ours
    if max_drop is not None:
        assert ours["drop"] <= max_drop, ours
    assert ours["kl"] <= kl_vs_rtn * rtn["kl"], (ours, rtn)
