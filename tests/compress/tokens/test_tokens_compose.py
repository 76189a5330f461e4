"""tokens → distill → INT8 quantize → export → engines on the demo model: the stages compose, the pooled
vision graph keeps its pooling MatMul in float (the INT8 pass quantizes weight MatMuls only), and the engines
bundle plans for the reduced count."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

RECIPE = """name: tokens-int8
version: 1.0.0
target: jetson-xavier-agx-32gb
calibration: {dataset: "builtin:micro-med-vqa", split: train, samples: 64}
evaluation: {dataset: "builtin:micro-med-vqa", split: test, max_samples: 120}
stages:
  - tokens: {count: 9, method: salient}
  - distill: {steps: 40, eval_every: 20, patience: 1}
  - quantize: {vision: int8, llm: w8a8, sensitivity: false}
  - export: {precision: fp16}
  - check: {max_closed_acc_drop: 100, min_agreement: 0.0, max_mean_kl: null, min_vision_cosine: null}
  - engines: {precision: int8}
"""


def test_tokens_distill_int8_engines(tmp_path):
    import onnx
    import onnx.numpy_helper

    from medlite.cli import main

    (tmp_path / "r.yaml").write_text(RECIPE)
    assert main(["build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "art")]) == 0
    (art,) = list((tmp_path / "art" / "micro-tinyllava-med" / "tokens-int8").glob("1.0.0+*"))
    cfg = json.loads((art / "medlite_runtime.json").read_text())
    assert cfg["num_image_tokens"] == 9
    assert cfg["graphs"]["vision"]["outputs"][0]["shape"][1] == 9
    g = onnx.load(str(art / "vision.onnx")).graph
    produced = {o: n for n in g.node for o in n.output}
    pooling = [n for n in g.node if n.op_type == "MatMul" and "medlite_token_pool" in n.name]
    assert len(pooling) == 2                                   # salient: P·(w⊙x) and P·w
    for n in pooling:
        src = produced[n.input[0]]
        assert src.op_type == "Constant"                       # the pooling matrix, a float constant: not quantized
        assert tuple(onnx.numpy_helper.to_array(src.attribute[0].t).shape) == (9, 49)
    assert any(n.op_type == "DequantizeLinear" for n in g.node)            # the rest of the tower is INT8
    proj = [n for n in g.node if n.op_type == "MatMul" and "projector" in n.name]
    assert proj and all(produced[n.input[1]].op_type == "DequantizeLinear" for n in proj)
    eng = json.loads((art / "engines" / "engines.json").read_text())
    assert eng["precision"] == "int8" and eng["limits"]["max_context_tokens"] == 1 + 9 + 128 + 128
