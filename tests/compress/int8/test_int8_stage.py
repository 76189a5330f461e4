"""``apply_int8`` on the tiny model: SmoothQuant on the working model, the export plan's fp32 + Q/DQ passes,
the manifest; the registered pass turns an exported fp32 graph into a TensorRT-8.5-clean Q/DQ graph."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest


from int8_fixtures import feeds, int8_state
from medlite.pipeline.contract import PassContext
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


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _weight_dq(graph: onnx.GraphProto) -> dict:
    """{MatMul/Conv node name: its weight's DequantizeLinear node} of a Q/DQ graph."""
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name for t in graph.initializer}
    return {n.name: dq[n.input[1]] for n in graph.node if n.op_type in ("MatMul", "Conv") and n.input[1] in dq
            and dq[n.input[1]].input[0] in inits}


def _session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC   # how quantized graphs run
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_registered_pass_on_an_exported_graph(built, graph, tmp_path):
    """The pass's Q/DQ graph against independent references: every int8 weight is numpy's per-output-channel
    symmetric int8 quantization of the fp32 graph's weight, and the graph's output stays close to the fp32
    graph's on held-out pairs (and is not the fp32 output: the nodes really are quantized)."""
    from onnx import numpy_helper

    from medlite.compress.int8.qdq_onnx import save_for_ort
    from medlite.export.graphs import decoder_onnx_from_model, vision_onnx_from_model

    state, _res, _ = built
    m = state.model.model
    if graph == "vision":
        proto = vision_onnx_from_model(m, image_size=int(m.config.vision_config.image_size), opset=17, metadata={},
                                       tmp_root=tmp_path / "t")
    else:
        proto = decoder_onnx_from_model(m, opset=17, metadata={}, tmp_root=tmp_path / "t")
    fp32_path = save_for_ort(_copy(proto), tmp_path / "fp32" / f"{graph}.onnx")
    name, fn = state.export_plan.graph(graph).passes[0]
    out = fn(proto, PassContext(graph=graph, ctx=state.ctx, model=state.model, state=state, tmp_dir=tmp_path / "p"))
    assert isinstance(out, onnx.ModelProto)
    assert qdq_issues(out) == [] and trt_check_from_onnx(out).ok
    excluded = set(state.export_plan.graph(graph).quantization["excluded_nodes"])
    path = save_for_ort(out, tmp_path / "w" / f"{graph}.onnx")

    q_graph, f_graph = onnx.load(str(path)).graph, onnx.load(str(fp32_path)).graph
    q_init = {t.name: t for t in q_graph.initializer}
    f_init = {t.name: t for t in f_graph.initializer}
    f_nodes = {n.name: n for n in f_graph.node}
    weight_dq = _weight_dq(q_graph)
    assert weight_dq and not (set(weight_dq) & excluded)
    assert len(weight_dq) == state.export_plan.graph(graph).quantization["quantized_nodes"]
    for node_name, dq in weight_dq.items():
        node = f_nodes[node_name]
        w = numpy_helper.to_array(f_init[node.input[1]]).astype(np.float64)
        q = numpy_helper.to_array(q_init[dq.input[0]])
        scale = numpy_helper.to_array(q_init[dq.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(q_init[dq.input[2]]) if len(dq.input) > 2 else np.zeros(1)
        axis = 1 if node.op_type == "MatMul" else 0                     # the output channel
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        want_scale = np.abs(w).max(axis=reduce) / 127.0
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        want_q = np.clip(np.round(w / want_scale.reshape(shape)), -127, 127)
        assert q.dtype == np.int8 and not np.any(zero), node_name
        np.testing.assert_allclose(scale, want_scale, rtol=1e-6, err_msg=node_name)
        # ties (w / scale exactly at .5) may round either way: off by at most one step, almost never
        diff = np.abs(q.astype(np.int64) - want_q)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, node_name

    one_per_image = list({s.image_id: s for s in state.calibration.heldout}.values())[:4]
    rows = feeds(state.model, one_per_image, graph)
    ref, got = _session(fp32_path), _session(path)
    out_name = ref.get_outputs()[0].name
    for f in rows:
        y_ref = ref.run([out_name], f)[0].astype(np.float64)
        y = got.run([out_name], f)[0].astype(np.float64)
        assert y.shape == y_ref.shape and not np.array_equal(y, y_ref)
        cos = (y * y_ref).sum() / np.sqrt((y * y).sum() * (y_ref * y_ref).sum())
        rel = np.sqrt(((y - y_ref) ** 2).mean() / (y_ref ** 2).mean())
        # measured on the tiny model: vision cos 0.99975 / rel 0.022, decoder logits cos 0.9991 / rel 0.042;
        # a wrong scale or a lost Q/DQ pair is off by orders of magnitude
        assert cos > 0.998 and rel < 0.1, (cos, rel)


def test_nothing_to_do(tiny_path, cctx, calib):
    from medlite.checkpoints import load_model

    state = int8_state(cctx, load_model(tiny_path, ctx=cctx), calib)
    res = apply_int8(state, 0, QuantizeOptions(vision="fp16", llm="fp16"))
    assert "nothing" in res.summary and not state.export_plan.graphs
