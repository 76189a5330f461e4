"""fp16 storage of the float weights of a Q/DQ graph: the Q/DQ scales stay constant fp32 initializers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from medlite.compress.int8 import qdq_onnx as Q
from medlite.export.trt_ops import trt_check_from_onnx


def _qdq_graph(rng) -> onnx.ModelProto:
    """x → Q/DQ (per-tensor) → MatMul with a per-channel DQ weight (32 channels) → + bias (32)."""
    w = rng.standard_normal((16, 32)).astype(np.float32)
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.round(w / scale).astype(np.int8)
    inits = [numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(scale, "W_scale"),
             numpy_helper.from_array(np.zeros(32, np.int8), "W_zp"),
             numpy_helper.from_array(np.float32(0.05), "x_scale"), numpy_helper.from_array(np.int8(0), "x_zp"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "bias")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["Wq", "W_scale", "W_zp"], ["W"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["xd", "W"], ["y"], name="mm"),
             helper.make_node("Add", ["y", "bias"], ["out"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 32])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_per_channel_scales_stay_constant_fp32(tmp_path):
    rng = np.random.default_rng(0)
    proto = _qdq_graph(rng)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert trt_check_from_onnx(proto).ok
    # min_elements below the scales' 32 channels (the full-size gate/up scales have 5632 >= 4096)
    saved = Q.float_weights_to_fp16(proto, tmp_path / "w16.bin", min_elements=16)
    inits = {t.name: t for t in proto.graph.initializer}
    assert saved == 32 * 2                                   # only the bias went to fp16
    assert inits["W_scale"].data_type == TensorProto.FLOAT and "bias__fp16" in inits
    assert trt_check_from_onnx(proto).ok, trt_check_from_onnx(proto).summary()
    path = Q.save_for_ort(proto, tmp_path / "g" / "m.onnx")     # staged (absolute) weights → loadable file
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=2e-3)
