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


def _weightless(name: str, dims: list) -> onnx.TensorProto:
    """An fp32 initializer of the given shape whose data lives in an (absent) external file: a full-size
    graph's structure without its 4 GB of weights (feed_rows never loads weights)."""
    t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "absent.data"), ("offset", "0"), ("length", str(4 * int(np.prod(dims))))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


def _full_size_decoder(path, layers=22, hidden=2048, kv=256, inter=5632):
    """The full-size decoder's MatMuls (TinyLlama shapes): q/k/v share their input, so do gate/up.
    Returns the calibrated tensors and, independently of feed_rows, their activation widths."""
    nodes, inits, widths = [], [], {}
    x = "embeds"
    for i in range(layers):
        n1, att, n2, act, out = (f"l{i}.{t}" for t in ("norm1", "attn", "norm2", "act", "out"))
        for proj, src, k, n in (("q", n1, hidden, hidden), ("k", n1, hidden, kv), ("v", n1, hidden, kv),
                                ("o", att, hidden, hidden), ("gate", n2, hidden, inter), ("up", n2, hidden, inter),
                                ("down", act, inter, hidden)):
            inits.append(_weightless(f"l{i}.{proj}.w", [k, n]))
            nodes.append(helper.make_node("MatMul", [src, f"l{i}.{proj}.w"], [f"l{i}.{proj}.y"], name=f"l{i}.{proj}"))
            widths[src] = k
        nodes += [helper.make_node("Identity", [x], [n1]), helper.make_node("Identity", [f"l{i}.o.y"], [n2]),
                  helper.make_node("Identity", [f"l{i}.v.y"], [att]), helper.make_node("Identity", [f"l{i}.up.y"], [act]),
                  helper.make_node("Identity", [f"l{i}.down.y"], [out])]
        x = out
    graph = helper.make_graph(nodes, "decoder",
                              [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, [None, None, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, None, hidden])], inits)
    onnx.save(helper.make_model(graph), str(path))
    return set(widths), widths


def test_full_size_decoder_gets_one_row_per_feed(tmp_path):
    """Full-size decoder widths (22 layers x (3 x 2048 + 5632)) at ~800 tokens: ~0.8 GB per row, so the
    default 1 GiB budget gives one row per feed; shorter feeds or a larger budget give more, up to the cap."""
    from medlite.compress.int8.stage import FEED_BYTES

    path = tmp_path / "decoder.onnx"
    tensors, widths = _full_size_decoder(path)
    assert len(tensors) == 22 * 4 and sum(widths.values()) == 22 * (3 * 2048 + 5632)

    def want(tokens, budget, cap=8):          # the rule, from the widths the graph was built with
        per_row = 4 * tokens * sum(widths.values())
        return max(1, min(cap, budget // per_row))

    assert 0.7e9 < 4 * 800 * sum(widths.values()) < FEED_BYTES == 1 << 30
    for tokens, budget in ((800, FEED_BYTES), (800, 2 * FEED_BYTES + 1), (400, FEED_BYTES), (100, FEED_BYTES),
                           (800, 1)):
        assert feed_rows(path, tensors, tokens, budget=budget) == want(tokens, budget), (tokens, budget)
    assert feed_rows(path, tensors, 800) == 1
    assert feed_rows(path, tensors, 100) == 8              # 0.1 GB per row: capped
    # only the calibrated tensors count: the down projections' inputs alone (0.40 GB per row) fit 2 rows
    down = {t for t in tensors if t.endswith(".act")}
    assert FEED_BYTES // (4 * 800 * 22 * 5632) == 2 and feed_rows(path, down, 800) == 2


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
