"""The sensitivity fallback's stopping rule: a one-sided upper confidence bound of the tie KL.

The bound is checked against an independent computation (numpy + scipy's Student t, and a Monte Carlo
coverage check that needs neither), and the fallback is checked to keep more layers when the bound
— not the mean — is above the target (a heavy-tailed layer whose harm sits on a few rows).
"""
from __future__ import annotations

import numpy as np
import pytest

from int8_fixtures import int8_state, quantize_recipe
from medlite.compress.int8.sensitivity import (DEFAULT_CONFIDENCE, Gate, GraphMetric, answer_metrics,
                                               choose_fallback, t_quantile, upper_mean_bound)
from medlite.errors import RecipeError
from medlite.recipes import load_recipe
from medlite.recipes.options import QuantizeOptions

ROWS = 64


@pytest.mark.parametrize("p", [0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("dof", [7, 15, 63, 127, 1311])
def test_t_quantile_matches_scipy(p, dof):
    stats = pytest.importorskip("scipy.stats")
    assert t_quantile(p, dof) == pytest.approx(float(stats.t.ppf(p, dof)), rel=1e-3)


def test_upper_bound_equals_an_independent_t_bound():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(128) ** 2 / 8 * 1e-3          # δ²/8-like: positive, right-skewed
    for conf in (0.9, 0.95):
        want = x.mean() + stats.t.ppf(conf, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
        assert upper_mean_bound(x, conf) == pytest.approx(want, rel=1e-4)
    assert upper_mean_bound(x, 0.95) > upper_mean_bound(x, 0.9) > x.mean()
    assert upper_mean_bound(np.full(10, 3e-5), 0.9) == pytest.approx(3e-5)   # no spread: the mean
    assert upper_mean_bound([2e-5], 0.9) == pytest.approx(2e-5)             # one row: nothing to estimate


def test_upper_bound_covers_the_true_mean_at_its_confidence():
    """Normal samples of 30: the bound is >= the true mean in ~90 % of draws (Monte Carlo, no scipy)."""
    rng = np.random.default_rng(1)
    draws = rng.normal(1.0, 2.0, size=(4000, 30))
    cover = np.mean([upper_mean_bound(d, 0.9) >= 1.0 for d in draws])
    assert abs(cover - 0.9) < 0.015, cover


def test_answer_metrics_rows_are_the_per_row_gap_shifts():
    rng = np.random.default_rng(2)
    ref = [rng.standard_normal((5, 7)), rng.standard_normal((3, 7))]
    cand = [r + 0.05 * rng.standard_normal(r.shape) for r in ref]
    m = answer_metrics(ref, cand)
    want = []
    for r, c in zip(np.concatenate(ref), np.concatenate(cand)):
        i, j = np.argsort(-r)[:2]
        want.append(((r[i] - r[j]) - (c[i] - c[j])) ** 2 / 8)
    assert m.tie_rows == pytest.approx(want) and m.tie_kl == pytest.approx(np.mean(want))
    assert m.tie_kl_upper is None                              # no bound until a confidence is given
    m.with_bound(0.9)
    assert m.tie_kl_upper == pytest.approx(upper_mean_bound(want, 0.9)) and m.confidence == 0.9
    d = m.to_dict()
    assert d["tie_kl_upper"] == pytest.approx(m.tie_kl_upper, rel=1e-5) and d["confidence"] == 0.9 and d["rows"] == 8


def _rows(excluded) -> np.ndarray:
    """Per-row δ²/8 of a graph with every layer but ``excluded`` quantized: "big" and "small"/"tiny"
    harm every row alike; "spiky" puts its (smaller) mean harm on 2 rows of 64 — a heavy tail."""
    spiky = np.zeros(ROWS)
    spiky[[5, 40]] = 3e-5 * ROWS / 2
    harm = {"big": np.full(ROWS, 4e-5), "spiky": spiky, "small": np.full(ROWS, 1e-5), "tiny": np.full(ROWS, 5e-6)}
    return sum((v for k, v in harm.items() if k not in excluded), np.zeros(ROWS))


def _measure(excluded, cosine=None):
    rows = _rows(excluded)
    return GraphMetric(loss=float(rows.mean()), tie_kl=float(rows.mean()), tie_rows=rows, top1_agreement=1.0,
                       cosine=cosine)


LAYERS = ["big", "spiky", "small", "tiny"]


def test_the_fallback_keeps_more_layers_when_the_bound_is_above_target():
    gate = Gate(max_kl=5e-5)
    mean_rule = choose_fallback(LAYERS, _measure, gate, max_fp16=4, confidence=None)
    bound_rule = choose_fallback(LAYERS, _measure, gate, max_fp16=4, confidence=0.9)
    # the mean passes with "big" kept, but the remaining spiky harm's bound does not
    assert mean_rule.kept_fp16 == ["big"] and mean_rule.gate_holds
    assert mean_rule.metric_final.tie_kl == pytest.approx(4.5e-5)
    assert upper_mean_bound(_rows(["big"]), 0.9) > 5e-5
    assert bound_rule.kept_fp16 == ["big", "spiky"] and bound_rule.gate_holds
    assert bound_rule.metric_final.tie_kl_upper == pytest.approx(upper_mean_bound(_rows(["big", "spiky"]), 0.9))
    assert bound_rule.metric_final.tie_kl_upper <= 5e-5
    # recorded for the report and the manifest
    d = bound_rule.to_dict()
    assert d["confidence"] == 0.9 and d["target_tie_kl"] == pytest.approx(5e-5)
    assert d["metric_final"]["tie_kl_upper"] == pytest.approx(bound_rule.metric_final.tie_kl_upper, rel=1e-5)
    assert d["metric_all_int8"]["tie_kl_upper"] > d["metric_all_int8"]["tie_kl"]
    assert "upper 0.9 confidence bound" in d["stopping_rule"]
    assert mean_rule.to_dict()["confidence"] is None and "point estimate" in mean_rule.to_dict()["stopping_rule"]
    # the default confidence is the recipe option's default
    assert choose_fallback(LAYERS, _measure, gate, max_fp16=4).confidence == DEFAULT_CONFIDENCE \
        == QuantizeOptions().sensitivity_confidence


def test_the_vision_cosine_gate_still_decides():
    """Tie KL within its bound but the embedding cosine below the gate: keep layers until the cosine holds."""
    def measure(excluded):
        return _measure(list(excluded) + ["big", "spiky"], cosine=0.9995 if "small" in excluded else 0.998)

    fb = choose_fallback(["tiny", "small"], measure, Gate(min_cosine=0.999, max_kl=1e-3), max_fp16=2, confidence=0.95)
    assert fb.metric_all.tie_kl_upper < 1e-3 and fb.metric_all.cosine < 0.999    # only the cosine fails
    assert fb.kept_fp16 == ["small"] and fb.gate_holds and fb.metric_final.cosine == 0.9995


def test_sensitivity_confidence_in_the_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(quantize_recipe(vision="int8", sensitivity_confidence=0.95))
    assert load_recipe(p).recipe.stage("quantize").sensitivity_confidence == 0.95
    p.write_text(quantize_recipe(vision="int8", sensitivity_confidence="null"))
    assert load_recipe(p).recipe.stage("quantize").sensitivity_confidence is None
    p.write_text(quantize_recipe(vision="int8", sensitivity_confidence=1.0))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert any(e.startswith("stages[0].quantize.sensitivity_confidence:") for e in ei.value.errors), ei.value.errors


class _Seen(Exception):
    pass


def test_the_stage_passes_the_confidence_to_the_fallback(tiny_path, cctx, calib, monkeypatch):
    import medlite.compress.int8.sensitivity as sens
    import medlite.compress.int8.stage as stage
    from medlite.checkpoints import load_model

    got = {}

    def fake_fallback(layers, measure, gate, **kw):
        got.update(kw)
        raise _Seen

    monkeypatch.setattr(stage, "_heldout", lambda *a, **k: None)
    monkeypatch.setattr(sens, "choose_fallback", fake_fallback)
    state = int8_state(cctx, load_model(tiny_path, ctx=cctx), calib)
    with pytest.raises(_Seen):
        stage.apply_int8(state, 0, QuantizeOptions(vision="int8", sensitivity_confidence=0.95))
    assert got["confidence"] == 0.95
