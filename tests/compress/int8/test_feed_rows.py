"""``feed_rows``: rows per ORT calibration feed from the calibrated tensors' widths and a byte budget."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from medlite.compress.int8 import qdq_onnx as Q
from medlite.compress.int8.stage import feed_rows


def _graph(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 16])
    w1 = numpy_helper.from_array(np.zeros((16, 48), np.float32), "w1")     # K = 16
    w2 = numpy_helper.from_array(np.zeros((48, 16), np.float32), "w2")     # K = 48
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="down")]
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w1, w2])), str(path))
    return path


def test_rows_follow_the_budget(tmp_path):
    path = _graph(tmp_path)
    per_row = 4 * 10 * (16 + 48)                 # fp32 x 10 tokens x both calibrated inputs' widths
    assert feed_rows(path, {"x", "h"}, 10, budget=3 * per_row) == 3
    assert feed_rows(path, {"x", "h"}, 10, budget=3 * per_row - 1) == 2
    assert feed_rows(path, {"x"}, 10, budget=3 * per_row) == 8          # capped
    assert feed_rows(path, {"x", "h"}, 10, budget=1) == 1                # never below one row
    assert feed_rows(path, {"x", "h"}, 10, budget=10**12, cap=5) == 5


def test_full_size_decoder_gets_one_row_per_feed():
    """Full-size decoder widths (22 layers x (3 x 2048 + 5632)) at ~800 tokens: ~0.8 GB per row."""
    per_row = 4 * 800 * 22 * (3 * 2048 + 5632)
    assert 0.7e9 < per_row < 1 << 30 and (1 << 30) // per_row == 1


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibrator_keeps_no_weight_copy_and_ranges_match_numpy(method, tmp_path):
    """ORT's calibrator loads the whole graph with its weights; ours keeps only the weightless
    augmented graph (full-size decoder: 4.1 GB less at the calibration peak). The ranges it then
    computes still match numpy on the same feeds."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
                           helper.make_node("Relu", ["y"], ["z"], name="relu"),
                           helper.make_node("MatMul", ["z", "W2"], ["out"], name="mm2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 8])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w[:32, :8].copy(), "W2")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "aug").mkdir()
    cal = Q._calibrator(path, method, 100.0, tmp_path / "aug" / "aug.onnx", {"x", "z"})
    assert all(not t.HasField("raw_data") or len(t.raw_data) <= 64 for t in cal.model.graph.initializer)
    xs = [rng.standard_normal((3, 64)).astype(np.float32) for _ in range(2)]
    del cal
    n = Q.calibrate_ranges(path, [{"x": x} for x in xs], tmp_path / "r.json", method=method, percentile=100.0,
                           tensors={"x", "z"}, work_dir=tmp_path)
    data = json.loads((tmp_path / "r.json").read_text())["data"]
    z = np.concatenate([np.maximum(x @ w, 0) for x in xs])
    x = np.concatenate(xs)
    assert n == 2
    for name, ref in (("x", x), ("z", z)):
        hi = data[name]["highest"]       # symmetric: the absolute maximum (numpy arrays as {"data": [...]})
        hi = float(np.ravel(hi["data"])[0]) if isinstance(hi, dict) else float(hi)
        assert hi == pytest.approx(np.abs(ref).max(), rel=1e-2 if method != "minmax" else 1e-6)
