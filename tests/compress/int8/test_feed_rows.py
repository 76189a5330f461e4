"""``feed_rows``: rows per ORT calibration feed from the calibrated tensors' widths and a byte budget."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
