"""Calibration matters and every method works on feeds of different lengths; SmoothQuant is exact and
scoped to the language model; the sensitivity fallback keeps the most sensitive layers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from int8_fixtures import feeds, fp32_graphs, tiny8  # noqa: F401 - fixtures
from medlite.compress.int8 import qdq_onnx as Q


def _ranges(path) -> dict:
    d = json.loads(path.read_text())["data"]
    def value(x):   # numpy arrays are serialised as {"data": [...]}, floats as themselves
        return float(np.ravel(x["data"])[0]) if isinstance(x, dict) else float(x)

    return {k: value(v["highest"]) for k, v in d.items()}


def test_two_calibration_sets_give_different_scales(tiny8, calib, fp32_graphs, tmp_path, cctx):
    from medlite.calibration.calibset import build_calibration_set
    from medlite.evaluation.vqa import load_dataset

    other = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), 16, seed=7, ctx=cctx,
                                  cache=False)
    assert {s.qid for s in other.samples} != {s.qid for s in calib.samples}
    for graph in ("vision", "decoder"):
        a, b = tmp_path / f"{graph}-a.json", tmp_path / f"{graph}-b.json"
        Q.calibrate_ranges(fp32_graphs[graph], feeds(tiny8, calib.samples, graph), a)
        Q.calibrate_ranges(fp32_graphs[graph], feeds(tiny8, other.samples, graph), b)
        ra, rb = _ranges(a), _ranges(b)
        assert ra.keys() == rb.keys()
        assert any(abs(ra[k] - rb[k]) > 1e-6 * max(abs(ra[k]), 1e-12) for k in ra), graph
    # text-only decoder feeds (no image tokens) calibrate different ranges too
    t = tmp_path / "text.json"
    Q.calibrate_ranges(fp32_graphs["decoder"], feeds(tiny8, calib.samples, "decoder", text_only=True), t)
    assert _ranges(t) != _ranges(tmp_path / "decoder-a.json")


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_take_feeds_of_different_lengths(method, tiny8, calib, fp32_graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "HIST_BINS", 512)      # the method, not the resolution, is under test (speed)
    monkeypatch.setattr(Q, "ENTROPY_BINS", 256)
    fs = feeds(tiny8, calib.samples, "decoder")
    assert len({f["inputs_embeds"].shape[1] for f in fs}) > 1       # ORT's own loop fails on these
    mm, hist = tmp_path / "mm.json", tmp_path / f"{method}.json"
    Q.calibrate_ranges(fp32_graphs["decoder"], fs, mm, method="minmax")
    Q.calibrate_ranges(fp32_graphs["decoder"], fs, hist, method=method, percentile=99.0)
    r_mm, r_h = _ranges(mm), _ranges(hist)
    # a histogram method clips outliers: never above the min-max range, below it somewhere
    common = [k for k in r_h if k in r_mm]
    assert common and all(r_h[k] <= r_mm[k] * 1.01 + 1e-6 for k in common)
    assert any(r_h[k] < 0.99 * r_mm[k] for k in common)


def test_smoothquant_is_exact_and_scoped(tiny_path, cctx, calib):
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int8.smoothquant import smooth_language_model

    lm = load_model(tiny_path, ctx=cctx)
    vision_before = {k: v.clone() for k, v in lm.model.model.vision_tower.state_dict().items()}
    proj_before = {k: v.clone() for k, v in lm.model.model.multi_modal_projector.state_dict().items()}
    norm_before = lm.model.model.language_model.layers[0].input_layernorm.weight.detach().clone()
    loop = ForwardLoop(lm, calib.samples, batch_size=8)
    ref = []
    loop.run(lm.model, on_batch=lambda _i, logits: ref.append(logits.clone()))
    res = smooth_language_model(lm.model, loop, alpha=0.5)
    assert res.samples == len(calib.samples) and len(res.smoothed) == 2 * lm.model.config.text_config.num_hidden_layers
    assert all("language_model.layers." in n for n in res.smoothed)
    assert not torch.equal(norm_before, lm.model.model.language_model.layers[0].input_layernorm.weight)
    for k, v in lm.model.model.vision_tower.state_dict().items():
        assert torch.equal(v, vision_before[k]), k
    for k, v in lm.model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, proj_before[k]), k
    got = []
    loop.run(lm.model, on_batch=lambda _i, logits: got.append(logits.clone()))
    for a, b in zip(ref, got):      # smoothing is exact in real arithmetic: fp32 rounding only
        assert float((a - b).abs().max() / a.abs().max()) < 1e-4


def test_fallback_keeps_the_most_sensitive_layers_until_the_gate_holds():
    from medlite.compress.int8.sensitivity import Gate, GraphMetric, choose_fallback

    harm = {"a": 0.001, "b": 0.02, "c": 0.005, "d": 0.0001}

    def measure(excluded):
        kl = sum(v for k, v in harm.items() if k not in excluded)
        return GraphMetric(loss=kl, mean_kl=kl, top1_agreement=1.0)

    fb = choose_fallback(list(harm), measure, Gate(max_kl=0.004), max_fp16=3)
    assert fb.kept_fp16 == ["b", "c"] and fb.gate_holds
    assert fb.scores == pytest.approx(harm)
    assert fb.metric_final.mean_kl == pytest.approx(0.0011)
    capped = choose_fallback(list(harm), measure, Gate(max_kl=0.0005), max_fp16=1)
    assert capped.kept_fp16 == ["b"] and not capped.gate_holds
    easy = choose_fallback(list(harm), measure, Gate(max_kl=1.0), max_fp16=3)
    assert easy.kept_fp16 == [] and easy.gate_holds and np.isclose(easy.metric_all.mean_kl, sum(harm.values()))


def test_vision_smoothquant_is_exact_and_leaves_the_decoder(tiny_path, cctx, calib):
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.checkpoints.generate import image_features
    from medlite.compress.int8.smoothquant import smooth_vision_tower

    lm = load_model(tiny_path, ctx=cctx)
    dec_before = {k: v.clone() for k, v in lm.model.model.language_model.state_dict().items()}
    ln_before = lm.model.model.vision_tower.encoder.layers[0].layer_norm1.weight.detach().clone()
    loop = ForwardLoop(lm, calib.samples[:16], batch_size=8)
    px = next(loop.batches()).pixel_values
    with torch.no_grad():
        ref = image_features(lm.model, px).clone()
    res = smooth_vision_tower(lm.model, loop, alpha=0.5)
    assert res.smoothed and all("vision_tower.encoder.layers." in n for n in res.smoothed)
    assert not torch.equal(ln_before, lm.model.model.vision_tower.encoder.layers[0].layer_norm1.weight)
    for k, v in lm.model.model.language_model.state_dict().items():
        assert torch.equal(v, dec_before[k]), k
    with torch.no_grad():
        got = image_features(lm.model, px)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_vision_smoothquant_encodes_each_image_once_without_the_language_model(tiny_path, cctx, calib):
    """Vision smoothing runs only the tower (each distinct image once) and smooths exactly as driving
    the same hooks through the whole-VLM loop does (absmax: repeats and the decoder change nothing)."""
    from medlite.calibration.forward import ForwardLoop, distinct_images
    from medlite.checkpoints import load_model
    from medlite.compress.int8 import smoothquant as SQ

    samples = list(calib.samples[:10]) + list(calib.samples[:6])      # questions sharing an image
    assert len(distinct_images(samples)) == 10
    a, b, orig = (load_model(tiny_path, ctx=cctx) for _ in range(3))
    calls = []
    a.model.model.language_model.register_forward_pre_hook(lambda m, args, kw: calls.append(1), with_kwargs=True)
    res = SQ.smooth_vision_tower(a.model, ForwardLoop(a, samples, batch_size=5), alpha=0.5)
    assert not calls and res.samples == len(distinct_images(samples)) and res.to_dict()["samples_are"] == "images"

    class WholeVlm(ForwardLoop):        # the old driver: every pair through the whole VLM
        def run_images(self, model=None):
            return self.run(model, lm_head=False)

    SQ.smooth_vision_tower(b.model, WholeVlm(b, samples, batch_size=8), alpha=0.5)
    va, vb = a.model.model.vision_tower.state_dict(), b.model.model.vision_tower.state_dict()
    for k in va:
        torch.testing.assert_close(va[k], vb[k], rtol=1e-5, atol=1e-7, msg=k)
    vo = orig.model.model.vision_tower.state_dict()
    assert any(not torch.equal(va[k], vo[k]) for k in va if k.endswith("layer_norm1.weight"))   # it did smooth


def test_tie_kl_is_the_kl_a_tie_sees_and_ignores_confidence():
    """tie_kl = mean δ²/8 of the top-2 gap shift: on an exact two-way tie it equals the true KL (to
    second order); on a confident answer with the same shift the plain KL is far smaller, tie_kl not."""
    from medlite.checks import kl_divergence
    from medlite.compress.int8.sensitivity import Gate, answer_metrics

    d = 0.04
    tie, tie_q = np.array([[0.0, 0.0, -30.0]]), np.array([[-d / 2, d / 2, -30.0]])
    sure, sure_q = np.array([[6.0, 0.0, -30.0]]), np.array([[6.0 - d / 2, d / 2, -30.0]])
    m_tie = answer_metrics([tie], [tie_q])
    assert m_tie.tie_kl == pytest.approx(d * d / 8) and m_tie.loss == m_tie.tie_kl
    assert m_tie.mean_kl == pytest.approx(kl_divergence(tie[0], tie_q[0])) and m_tie.mean_kl == pytest.approx(d * d / 8, rel=1e-3)
    assert m_tie.top1_agreement == 0.0          # the tie flipped
    m_sure = answer_metrics([sure], [sure_q])
    assert m_sure.tie_kl == pytest.approx(d * d / 8) and m_sure.top1_agreement == 1.0
    assert m_sure.mean_kl < m_tie.mean_kl / 50    # what the plain KL of a confident answer hides
    # rows from several batches are pooled; the gate reads the tie KL
    both = answer_metrics([tie, sure], [tie_q, sure_q])
    assert both.tie_kl == pytest.approx(d * d / 8) and both.top1_agreement == 0.5
    assert not Gate(max_kl=d * d / 10).holds(both) and Gate(max_kl=d * d / 7).holds(both)


def test_rendered_views_of_one_source_image_are_distinct_calibration_images():
    """Views rendered from one source image share its image_id but not their pixels: each is fed."""
    from types import SimpleNamespace

    from medlite.compress.int8.calib_feeds import distinct_images

    fns = [lambda: 1, lambda: 2]
    samples = [SimpleNamespace(image_id="src", image_path=None, image_fn=f) for f in fns + fns[:1]]
    assert distinct_images(samples) == samples[:2]
    files = [SimpleNamespace(image_id="a", image_path=p, image_fn=None) for p in ("x.png", "y.png", "x.png")]
    assert distinct_images(files) == files[:2]


def test_vision_heldout_measures_the_answer_token(tiny8, calib, fp32_graphs, tmp_path):
    """The vision metric runs the whole VLM: the fp32 graph itself scores 0; a perturbed graph's KL
    equals the KL computed here from the torch model fed the perturbed graph's embeddings."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from medlite.calibration.forward import ForwardLoop
    from medlite.checks import kl_divergence
    from medlite.compress.int8.answer_heldout import VisionAnswerHeldOut

    samples = calib.heldout[:12] or calib.samples[:12]
    held = VisionAnswerHeldOut(fp32_graphs["vision"], ForwardLoop(tiny8, samples, batch_size=6), tiny8.model)
    same = held.metric(fp32_graphs["vision"])
    assert same.mean_kl < 1e-10 and same.top1_agreement == 1.0 and same.cosine > 0.999999
    proto = onnx.load(str(fp32_graphs["vision"]))
    w = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(w)
    w.CopyFrom(numpy_helper.from_array(arr + np.random.default_rng(0).normal(0, 0.2 * arr.std(), arr.shape).astype(arr.dtype), w.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    got = held.metric(bad)
    sess = ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    kls = []
    for inp in ForwardLoop(tiny8, samples, batch_size=6).batches(tiny8.model):
        img = torch.from_numpy(sess.run(None, {"pixel_values": inp.pixel_values.float().numpy()})[0])
        emb = inp.inputs_embeds.clone()
        emb[inp.image_positions] = img.reshape(-1, img.shape[-1])
        with torch.no_grad():
            out = tiny8.model.model.language_model(inputs_embeds=emb, attention_mask=inp.attention_mask,
                                                   position_ids=inp.position_ids)
            logits = tiny8.model.lm_head(out.last_hidden_state[:, -1]).double().numpy()
        kls.append(logits)
    ref_logits = np.concatenate(held.ref_logits)
    cand = np.concatenate(kls)
    want = np.mean([kl_divergence(r, c) for r, c in zip(ref_logits, cand)])
    assert got.mean_kl > 1e-6 and abs(got.mean_kl - want) <= 1e-6 * max(1.0, want) + 1e-9
    # tie KL from the same logits: the gap between the reference's two largest logits, before and after
    gaps = []
    for r, c in zip(ref_logits, cand):
        i, j = np.argpartition(-r, 1)[:2]
        i, j = (i, j) if r[i] >= r[j] else (j, i)
        gaps.append((r[i] - r[j]) - (c[i] - c[j]))
    assert got.tie_kl == pytest.approx(np.mean(np.square(gaps)) / 8, rel=1e-5) and got.loss == got.tie_kl


def test_forward_rows_bound_a_full_size_batch_and_keep_the_demo_batch():
    """Full-size TinyLLaVA shape: one decoder row (~790 positions) holds ~0.2 GB of transient
    activations per layer, so a 1 GiB batch budget takes 4 rows (was 8); SigLIP rows (729 positions,
    16 heads) are smaller; a tiny model keeps the cap."""
    from types import SimpleNamespace

    from medlite.checkpoints.random_ckpt import get_preset, preset_configs
    from medlite.compress.int8.smooth_pass import FORWARD_BYTES, forward_rows

    text, vision = preset_configs(get_preset("tinyllava-1.5b"))
    vision.image_size, vision.patch_size = 384, 14          # 729 image tokens
    full = SimpleNamespace(config=SimpleNamespace(text_config=text, vision_config=vision))
    rows = forward_rows(full, "decoder")
    per_row = 4 * (2 * 32 * 793 ** 2 + 3 * 793 * 5632 + 4 * 793 * 2048)      # independent arithmetic
    assert rows == FORWARD_BYTES // per_row == 4
    assert forward_rows(full, "vision") == 8 or forward_rows(full, "vision") > rows
    assert forward_rows(full, "decoder", budget=1) == 1
    tiny_text, tiny_vision = preset_configs(get_preset("tiny"))
    tiny = SimpleNamespace(config=SimpleNamespace(text_config=tiny_text, vision_config=tiny_vision))
    assert forward_rows(tiny, "decoder") == forward_rows(tiny, "vision") == 8
