"""``apply_int8`` on the tiny model: SmoothQuant on the working model, the export plan's fp32 + Q/DQ passes,
the manifest; the registered pass turns an exported fp32 graph into a TensorRT-8.5-clean Q/DQ graph."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest


from int8_fixtures import feeds, int8_state
from medlite.build.contract import PassContext
from medlite.compress.int8.stage import PASS_NAME, apply_int8
from medlite.export.qdq_rules import qdq_issues
from medlite.export.trt_ops import trt_check_from_onnx
from medlite.recipes.options import QuantizeOptions

# apply_int8 traces, calibrates and runs the sensitivity pass on both graphs: ~50 s on the busy 2-core machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tiny_path, cctx, calib):
    from medlite.checkpoints import load_model

    loaded = load_model(tiny_path, ctx=cctx)
    norm = loaded.model.model.language_model.layers[0].post_attention_layernorm.weight.detach().clone()
    state = int8_state(cctx, loaded, calib)
    opts = QuantizeOptions(vision="int8", llm="w8a8", max_fp16_layers=2)
    return state, apply_int8(state, 0, opts), norm


def test_stage_result_and_plan(built):
    state, res, norm = built
    assert not np.array_equal(norm.numpy(), state.model.model.model.language_model.layers[0]
                              .post_attention_layernorm.weight.detach().numpy())      # smoothed in place
    for g in ("vision", "decoder"):
        plan = state.export_plan.graph(g)
        assert plan.precision == "fp32" and [n for n, _ in plan.passes] == [PASS_NAME]
        rec = plan.quantization
        assert rec["scheme"] == "int8-static-qdq" and rec["quantized_nodes"] > 0
        assert isinstance(rec["excluded_nodes"], list)
        comp = res.manifest["components"][g]
        assert comp["bytes_after"] < comp["bytes_before"]
        assert set(comp["sensitivity"]["scores"]) and len(comp["kept_fp16"]) <= 2
    assert res.manifest["smoothquant"]["alpha"] == 0.5
    assert res.manifest["calibration"]["content_hash"] == state.calibration.content_hash
    assert res.bytes_after < res.bytes_before and res.report
    json.dumps(res.section(), sort_keys=True)        # manifest facts are JSON


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_registered_pass_on_an_exported_graph(built, graph, tmp_path):
    from medlite.compress.int8.qdq_onnx import save_for_ort
    from medlite.export.graphs import decoder_onnx_from_model, vision_onnx_from_model

    state, _res, _ = built
    m = state.model.model
    if graph == "vision":
        proto = vision_onnx_from_model(m, image_size=int(m.config.vision_config.image_size), opset=17, metadata={},
                                       tmp_root=tmp_path / "t")
    else:
        proto = decoder_onnx_from_model(m, opset=17, metadata={}, tmp_root=tmp_path / "t")
    name, fn = state.export_plan.graph(graph).passes[0]
    out = fn(proto, PassContext(graph=graph, ctx=state.ctx, model=state.model, state=state, tmp_dir=tmp_path / "p"))
    assert isinstance(out, onnx.ModelProto)
    assert qdq_issues(out) == [] and trt_check_from_onnx(out).ok
    excluded = set(state.export_plan.graph(graph).quantization["excluded_nodes"])
    quantized = {n.name for n in out.graph.node if n.op_type in ("MatMul", "Conv")
                 and any(p.op_type == "DequantizeLinear" and p.output[0] == n.input[1] for p in out.graph.node)}
    assert quantized and not (quantized & excluded)
    path = save_for_ort(out, tmp_path / "w" / f"{graph}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    f = feeds(state.model, state.calibration.heldout[:2], graph)[0]
    y = sess.run([sess.get_outputs()[0].name], f)[0]
    assert np.isfinite(y).all()


def test_nothing_to_do(tiny_path, cctx, calib):
    from medlite.checkpoints import load_model

    state = int8_state(cctx, load_model(tiny_path, ctx=cctx), calib)
    res = apply_int8(state, 0, QuantizeOptions(vision="fp16", llm="fp16"))
    assert "nothing" in res.summary and not state.export_plan.graphs
