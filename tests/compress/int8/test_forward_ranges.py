"""Min-max ranges from the SmoothQuant pass equal ONNX Runtime's own MinMax calibrator on the traced
(smoothed) graph — the independent reference — for the vision and decoder graphs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from int8_fixtures import feeds, fp32_graphs, tiny8  # noqa: F401 - fixtures
from medlite.compress.int8 import forward_ranges as F
from medlite.compress.int8 import qdq_onnx as Q


def _targets(path, graph) -> dict:
    proto = onnx.load(str(path), load_external_data=False)
    names = {t.node for t in Q.quant_targets(proto, graph, lm_head=True)}
    return {n.name: n.input[0] for n in proto.graph.node if n.name in names}


def _ort_ranges(path, graph_feeds, tmp_path) -> dict:
    cache = tmp_path / f"ort-{path.parent.name}.json"
    Q.calibrate_ranges(path, graph_feeds, cache)
    data = json.loads(cache.read_text())["data"]
    val = lambda x: float(np.ravel(x["data"])[0]) if isinstance(x, dict) else float(x)   # noqa: E731
    return {k: val(v["highest"]) for k, v in data.items()}


def _assert_same(ours: dict, ref: dict, tensors):
    assert set(tensors) <= set(ours) and set(tensors) <= set(ref)
    for t in tensors:
        assert ours[t] == pytest.approx(ref[t], rel=2e-5), t


def test_every_quantized_node_maps_to_a_module(tiny8, fp32_graphs):
    mods = dict(tiny8.model.named_modules())
    for graph in ("vision", "decoder"):
        targets = _targets(fp32_graphs[graph], graph)
        assert len(targets) >= 8
        for node in targets:
            name = F.module_of_node(node)
            assert name in F.quantizable_modules(tiny8.model, graph), node
            assert name in mods
    assert F.module_of_node("/lm/layers.3/mlp/down_proj/MatMul") == "model.language_model.layers.3.mlp.down_proj"
    assert F.module_of_node("/Add_3") is None


def test_unsmoothed_ranges_equal_onnxruntime_calibrator(tiny8, calib, fp32_graphs, tmp_path):
    from medlite.calibration.forward import ForwardLoop

    m = tiny8.model
    loop = ForwardLoop(tiny8, calib.samples, batch_size=8, equal_length=True)
    with F.AbsMaxObserver(m, F.quantizable_modules(m, "vision")) as vis:
        assert loop.run_images(m) > 1
    with F.AbsMaxObserver(m, F.quantizable_modules(m, "decoder")) as dec:
        loop.run(m, lm_head=True)
    for graph, obs in (("vision", vis), ("decoder", dec)):
        targets = _targets(fp32_graphs[graph], graph)
        ours, missing = F.ranges_for_graph(targets, obs.absmax)
        assert not missing
        ref = _ort_ranges(fp32_graphs[graph], feeds(tiny8, calib.samples, graph), tmp_path)
        _assert_same(ours, ref, set(targets.values()))


def test_padded_rows_would_widen_the_ranges(tiny8, calib):
    """Why the observing pass runs unpadded batches: pad positions are activations no answer uses."""
    from medlite.calibration.forward import ForwardLoop

    m = tiny8.model
    names = [n for n in F.quantizable_modules(m, "decoder") if n != "lm_head"]
    # 16 pairs, batches of 16: more than one batch only because the prompt lengths differ
    assert len(ForwardLoop(tiny8, calib.samples, batch_size=16, equal_length=True).chunks()) > 1
    out = {}
    for eq in (True, False):
        with F.AbsMaxObserver(m, names) as obs:
            ForwardLoop(tiny8, calib.samples, batch_size=16, equal_length=eq).run(m, lm_head=False)
        out[eq] = obs.absmax
    assert all(bool((out[False][n] >= out[True][n] * (1 - 1e-5)).all()) for n in names)   # float noise
    assert any(bool((out[False][n] > out[True][n] * (1 + 1e-6)).any()) for n in names)


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_smoothed_ranges_equal_onnxruntime_on_the_smoothed_graph(tiny_path, cctx, calib, tmp_path, graph):
    """Observed during SmoothQuant's pass, divided by its factors = calibrated after smoothing."""
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int8 import smoothquant as SQ
    from medlite.export.graphs import decoder_onnx_from_model, vision_onnx_from_model

    lm = load_model(tiny_path, ctx=cctx)
    m = lm.model
    loop = ForwardLoop(lm, calib.samples, batch_size=8, equal_length=True)
    smooth = SQ.smooth_vision_tower if graph == "vision" else SQ.smooth_language_model
    obs = F.AbsMaxObserver(m, F.quantizable_modules(m, graph))
    res = smooth(m, loop, alpha=0.5, observer=obs)
    assert res.factors and res.balance
    assert any(float((s - 1).abs().max()) > 1e-3 for s in res.factors.values())      # it did smooth
    absmax = F.smoothed_absmax(obs.absmax, res.factors, res.balance)
    if graph == "vision":
        proto = vision_onnx_from_model(m, image_size=int(m.config.vision_config.image_size), opset=17, metadata={},
                                       tmp_root=tmp_path / "t")
    else:
        proto = decoder_onnx_from_model(m, opset=17, metadata={}, tmp_root=tmp_path / "t")
    path = Q.save_for_ort(proto, tmp_path / graph / "fp32.onnx")
    targets = _targets(path, graph)
    ours, missing = F.ranges_for_graph(targets, absmax)
    assert not missing
    ref = _ort_ranges(path, feeds(lm, calib.samples, graph), tmp_path)
    _assert_same(ours, ref, set(targets.values()))
    # and the unsmoothed observation would not have matched (the division is what makes it exact)
    raw, _ = F.ranges_for_graph(targets, obs.absmax)
    assert any(abs(raw[t] - ref[t]) > 1e-3 * ref[t] for t in raw)


def test_saved_ranges_are_onnxruntime_cache_format(tmp_path):
    from onnxruntime.quantization.calibrate import load_tensors_data

    F.save_ranges({"a": 2.5, "b": 0.125}, tmp_path / "r.json")
    td = load_tensors_data(tmp_path / "r.json")
    assert float(td["a"].range_value[1]) == 2.5 and float(td["a"].range_value[0]) == -2.5
    assert float(td["b"].range_value[1]) == 0.125


@pytest.mark.parametrize("extra", [[], ["attn_out", "mlp_down"]])
def test_stage_forward_ranges_equal_its_graph_ranges_and_skip_the_calibrator(tiny_path, cctx, calib, monkeypatch, extra):
    """The quantize stage with ``minmax_ranges: forward`` writes the same ranges as with ``graph`` (ONNX
    Runtime's calibrator on each traced graph) and never runs that calibrator. One prompt length, so
    both modes smooth on identical batches."""
    import dataclasses
    from pathlib import Path

    from int8_fixtures import int8_state
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int8 import stage as S
    from medlite.recipes.options import QuantizeOptions

    base = load_model(tiny_path, ctx=cctx)
    same = max(ForwardLoop(base, calib.samples, batch_size=100, equal_length=True).chunks(), key=len)
    assert len(same) >= 3
    cal = dataclasses.replace(calib, samples=same, heldout=[])
    seen, calls = {}, []
    real_q, real_cal = S.quantized_proto, Q.calibrate_ranges

    def spy_q(fp32, out, ranges, nodes, **kw):
        seen[(mode, Path(fp32).parent.name)] = _highest(Path(ranges))
        return real_q(fp32, out, ranges, nodes, **kw)

    def spy_cal(*a, **kw):
        calls.append(mode)
        return real_cal(*a, **kw)

    monkeypatch.setattr(S, "quantized_proto", spy_q)
    monkeypatch.setattr(Q, "calibrate_ranges", spy_cal)
    manifests = {}
    for mode in ("forward", "graph"):
        state = int8_state(cctx, load_model(tiny_path, ctx=cctx), cal)
        opts = QuantizeOptions(vision="int8", llm="w8a8", vision_smoothquant_alpha=0.5, sensitivity=False,
                               minmax_ranges=mode, smooth_extra=extra)
        manifests[mode] = S.apply_int8(state, 0, opts).manifest
    assert calls.count("forward") == 0 and calls.count("graph") == 2
    for graph in ("vision", "decoder"):
        a, b = seen[("forward", graph)], seen[("graph", graph)]
        assert a.keys() == b.keys() and len(a) >= 4
        for t in a:
            assert a[t] == pytest.approx(b[t], rel=2e-5), (graph, t)
        assert manifests["forward"]["components"][graph]["calibration_feeds"] == (len(same) if graph == "decoder" else
                                                                                  len({id(s.image_fn) for s in same}))


def _highest(path) -> dict:
    data = json.loads(path.read_text())["data"]
    val = lambda x: float(np.ravel(x["data"])[0]) if isinstance(x, dict) else float(x)   # noqa: E731
    return {k: val(v["highest"]) for k, v in data.items()}


def test_column_probe_reads_back_column_factors():
    import torch

    lin = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight[:, 5] = 0                     # an all-zero column: factor unknown
    m = torch.nn.Sequential(lin)
    probe = F.ColumnProbe(m, ["0"])
    s = torch.tensor([0.5, 2.0, 3.0, 1.0, 0.25, 7.0])
    with torch.no_grad():
        lin.weight.mul_(s.view(1, -1))
    got = probe.factors(m)["0"]
    torch.testing.assert_close(got[:5], s[:5], rtol=1e-6, atol=0)
    assert torch.isnan(got[5])
    fr = F.ForwardRanges.__new__(F.ForwardRanges)
    fr.absmax = {"decoder": {"0": torch.ones(6), "other": torch.ones(3)}}
    fr.divide({"0": got})
    assert "0" not in fr.absmax["decoder"] and "other" in fr.absmax["decoder"]   # unknown → ORT fallback
    fr.absmax = {"decoder": {"0": torch.ones(5)}}
    fr.divide({"0": s[:5]})
    torch.testing.assert_close(fr.absmax["decoder"]["0"], 1 / s[:5])


def test_lm_head_is_observed_only_when_quantized(tiny8):
    from medlite.compress.int8.smoothquant import _runs_head

    off = F.ForwardRanges(tiny8.model, ["decoder"])
    on = F.ForwardRanges(tiny8.model, ["decoder"], lm_head=True)
    assert "lm_head" not in off.observer("decoder").names and not _runs_head(off.observer("decoder"))
    assert "lm_head" in on.observer("decoder").names and _runs_head(on.observer("decoder"))
