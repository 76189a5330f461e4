"""The Q/DQ rule checker names the node that breaks each of TensorRT 8.5's explicit-quantization rules."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from medlite.export.qdq_rules import qdq_issues, qdq_summary
from medlite.export.trt_ops import trt_check_from_onnx

K, N = 8, 6


def _weight_dq(axis=1, scale_shape=(N,), name="dq_w"):
    w = np.arange(K * N, dtype=np.int8).reshape(K, N) - 20
    inits = [numpy_helper.from_array(w, "w_q"),
             numpy_helper.from_array(np.full(scale_shape, 0.02, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(scale_shape, np.int8), "w_z")]
    return [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=axis, name=name)], inits


def _graph(act_nodes, act_inits, *, w_axis=1, w_scale=(N,), opset=17, zp_type=TensorProto.INT8, zp=0):
    """x → Q → DQ → MatMul(DQ(weight)) → y; the activation Q/DQ nodes can be replaced."""
    inits = list(act_inits)
    if act_nodes is None:
        inits += [helper.make_tensor("x_s", TensorProto.FLOAT, [], [0.05]),
                  helper.make_tensor("x_z", zp_type, [], [zp])]
        act_nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"], name="q_x"),
                     helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="dq_x")]
    wn, wi = _weight_dq(w_axis, w_scale)
    nodes = act_nodes + wn + [helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])], initializer=inits + wi)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model):
    return {(i.rule, i.node) for i in qdq_issues(model)}


def test_clean_graph_passes_and_runs():
    m = _graph(None, [])
    onnx.checker.check_model(m, full_check=True)
    assert qdq_issues(m) == []
    assert trt_check_from_onnx(m).ok
    assert qdq_summary(m)["per_channel_weights"] == 1
    # independent reference: ONNX Runtime runs the graph as numpy fake-quant math says
    x = np.linspace(-3, 3, 2 * K, dtype=np.float32).reshape(2, K)
    (y,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    xq = np.clip(np.round(x / 0.05), -128, 127) * 0.05
    w = (np.arange(K * N).reshape(K, N) - 20).astype(np.float32) * 0.02
    np.testing.assert_allclose(y, xq @ w, rtol=1e-5, atol=1e-6)


def test_asymmetric_zero_point_is_named():
    m = _graph(None, [], zp=3)
    assert ("symmetric", "q_x") in _rules(m) and ("symmetric", "dq_x") in _rules(m)
    issues = trt_check_from_onnx(m).issues
    assert any(i.node == "q_x" and "symmetric" in i.detail and "must be 0" in i.detail for i in issues)


def test_uint8_quantization_is_named():
    m = _graph(None, [], zp_type=TensorProto.UINT8, zp=0)
    assert ("int8", "q_x") in _rules(m)


def test_per_channel_activation_scale_is_named():
    inits = [numpy_helper.from_array(np.full((K,), 0.05, np.float32), "x_s"),
             numpy_helper.from_array(np.zeros((K,), np.int8), "x_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"], axis=1, name="q_act"),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], axis=1, name="dq_act")]
    m = _graph(nodes, inits)
    onnx.checker.check_model(m)
    rules = _rules(m)
    assert ("per-channel-activation", "q_act") in rules and ("per-channel-activation", "dq_act") in rules
    assert not any(node == "dq_w" for _, node in rules)      # the weight's per-channel scale is fine


def test_dynamic_scale_is_named():
    inits = [helper.make_tensor("c127", TensorProto.FLOAT, [], [127.0]), helper.make_tensor("x_z", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("Abs", ["x"], ["ax"]),
             helper.make_node("ReduceMax", ["ax"], ["mx"], keepdims=0),
             helper.make_node("Div", ["mx", "c127"], ["x_s"]),
             helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"], name="q_dyn"),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="dq_dyn")]
    m = _graph(nodes, inits)
    onnx.checker.check_model(m)
    assert {("dynamic-scale", "q_dyn"), ("dynamic-scale", "dq_dyn")} <= _rules(m)
    assert not trt_check_from_onnx(m).ok


def test_int4_qdq_is_named():
    m = _graph(None, [], zp_type=TensorProto.INT4, opset=21)
    onnx.checker.check_model(m)
    issues = qdq_issues(m)
    assert ("int8", "q_x") in {(i.rule, i.node) for i in issues}
    assert any("INT4" in i.detail for i in issues if i.node == "q_x")
    assert any(i.rule == "opset" for i in issues)


@pytest.mark.parametrize("axis,scale", [(0, (K,)), (1, (K,))])
def test_per_channel_weight_along_the_wrong_axis_is_named(axis, scale):
    m = _graph(None, [], w_axis=axis, w_scale=scale)
    assert ("per-channel-axis", "dq_w") in _rules(m)


def test_gemm_and_conv_axes():
    # Gemm with transB=1 reads B as [N, K]: output channels are axis 0; Conv weights [O, I, kh, kw]: axis 0
    w = np.ones((N, K), np.int8)
    inits = [numpy_helper.from_array(w, "b_q"), numpy_helper.from_array(np.full((N,), 0.1, np.float32), "b_s"),
             numpy_helper.from_array(np.zeros((N,), np.int8), "b_z")]
    nodes = [helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], axis=0, name="dq_b"),
             helper.make_node("Gemm", ["x", "b"], ["y"], transB=1, name="gemm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])], initializer=inits)
    good = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert qdq_issues(good) == []
    nodes[1] = helper.make_node("Gemm", ["x", "bt"], ["y"], name="gemm")
    nodes.insert(1, helper.make_node("Transpose", ["b"], ["bt"]))
    del g.node[:]
    g.node.extend(nodes)
    transposed = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert ("per-channel-axis", "dq_b") in _rules(transposed)   # per-channel into a Transpose: not a weight input
