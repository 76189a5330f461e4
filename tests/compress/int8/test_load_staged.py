"""``load_staged``: a quantized graph whose ``Constant`` went to external data still ships whole."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from medlite.compress.int8 import qdq_onnx as Q


def _graph_with_big_constant(tmp_path):
    """x + C (a 4 KB Constant node, like the full-size position-embedding table) → MatMul W."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((8, 128)).astype(np.float32)
    w = rng.standard_normal((128, 16)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["c"], name="pos/Constant", value=numpy_helper.from_array(c, "c")),
             helper.make_node("Add", ["x", "c"], ["h"], name="add"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])],
                          [numpy_helper.from_array(w, "W")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, c, w


def test_constant_with_external_data_is_read_back(tmp_path):
    path, c, w = _graph_with_big_constant(tmp_path)
    x = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    cache = tmp_path / "ranges.json"
    assert Q.calibrate_ranges(path, [{"x": x}], cache) == 1
    (tmp_path / "q").mkdir()
    q = Q.quantize_graph(path, tmp_path / "q" / "q.onnx", cache, ["mm"])
    # what quantize_static wrote: the Constant's value lives in q.onnx.data (the full-size failure)
    raw = onnx.load(str(q), load_external_data=False)
    const = next(n for n in raw.graph.node if n.op_type == "Constant" and n.output[0] == "c")
    assert const.attribute[0].t.data_location == TensorProto.EXTERNAL

    proto = Q.load_staged(q)
    const = next(n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] == "c")
    assert const.attribute[0].t.data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(const.attribute[0].t), c)
    # initializers stay external with absolute locations (staged for the writer)
    assert all(e.value.startswith("/") for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL
               for e in t.external_data if e.key == "location")

    # moved elsewhere without q.onnx.data next to it, the graph still checks and runs
    # (written by the product's writer, as the stage does), q.onnx's folder removed afterwards
    out = Q.save_for_ort(proto, tmp_path / "elsewhere" / "vision.onnx")
    shutil.rmtree(tmp_path / "q")
    onnx.checker.check_model(str(out))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, (x + c) @ w, rtol=0.05, atol=0.05 * np.abs((x + c) @ w).max())


def test_quantize_graph_keeps_onnxruntime_advice_out_of_the_output(tmp_path, caplog):
    """onnxruntime.quantization's "Please consider pre-processing" (root logger, every call) does not reach
    the user; the root logger's level is restored afterwards."""
    import logging

    path, _, _ = _graph_with_big_constant(tmp_path)
    x = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    cache = tmp_path / "ranges.json"
    Q.calibrate_ranges(path, [{"x": x}], cache)
    (tmp_path / "q").mkdir()
    level = logging.getLogger().level
    with caplog.at_level(logging.WARNING):
        logging.getLogger().setLevel(logging.WARNING)
        Q.quantize_graph(path, tmp_path / "q" / "q.onnx", cache, ["mm"])
        assert logging.getLogger().level == logging.WARNING
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()], caplog.text
    logging.getLogger().setLevel(level)
