"""Gate math against independent numpy references and hand values; gate lines; the compare loop."""
import math

import numpy as np
import pytest

from medlite import checks
from medlite.evaluation.samples import VqaSample
from medlite.recipes.schema import CheckOptions


def _kl_reference(p_logits, q_logits):
    # Independent formulation: explicit probabilities, plain loops, no log-softmax trick.
    p = np.exp(p_logits - p_logits.max()); p /= p.sum()
    q = np.exp(q_logits - q_logits.max()); q /= q.sum()
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_kl_identical_is_zero_and_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50).astype(np.float32)
    assert checks.kl_divergence(a, a) == 0.0
    assert checks.kl_divergence(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)   # softmax shift invariance
    b = a + rng.normal(scale=0.3, size=50).astype(np.float32)
    assert checks.kl_divergence(a, b) == pytest.approx(_kl_reference(a.astype(np.float64), b.astype(np.float64)),
                                                       rel=1e-9)
    assert checks.kl_divergence(a, b) != pytest.approx(checks.kl_divergence(b, a), rel=1e-6)  # not symmetric


def test_kl_hand_values():
    # P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    p, q = np.log([0.5, 0.5]), np.log([0.25, 0.75])
    assert checks.kl_divergence(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    # A token suppressed in both (-inf) contributes nothing; suppressed only in Q → infinite.
    p3, q3 = np.array([0.0, 0.0, -np.inf]), np.array([0.0, 0.0, -np.inf])
    assert checks.kl_divergence(p3, q3) == 0.0
    assert checks.kl_divergence(np.array([0.0, 0.0]), np.array([0.0, -np.inf])) == math.inf
    with pytest.raises(ValueError):
        checks.kl_divergence(np.zeros(3), np.zeros(4))


def test_mean_cosine_hand_values():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 0.0], [2.0, 0.0], [-3.0, -4.0]])      # cosines 1, 0, -1
    assert checks.mean_cosine(a, b) == pytest.approx(0.0, abs=1e-15)
    assert checks.mean_cosine(a, 5 * a) == pytest.approx(1.0)
    z = np.zeros((2, 3))
    assert checks.mean_cosine(z, z) == 1.0
    assert checks.mean_cosine(z, np.ones((2, 3))) == 0.0
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 16)), rng.normal(size=(7, 16))
    ref = np.mean([xi @ yi / (np.linalg.norm(xi) * np.linalg.norm(yi)) for xi, yi in zip(x, y)])
    assert checks.mean_cosine(x, y) == pytest.approx(ref, rel=1e-12)


def test_agreement_uses_answer_normalisation():
    assert checks.agreement(["Yes.", "The left lung", "CT"], ["yes", "left lung", "MRI"]) == pytest.approx(2 / 3)
    assert math.isnan(checks.agreement([], []))


def test_gate_lines_match_the_documented_form():
    opts = CheckOptions(max_closed_acc_drop=1.0, min_agreement=0.995, max_mean_kl=0.01, min_vision_cosine=0.999)
    metrics = {"closed_acc_drop": 2.5, "agreement": 0.971, "mean_kl": 0.0004, "vision_cosine": 0.99995}
    gates = {g.name: g for g in checks.evaluate_gates(metrics, opts)}
    assert gates["agreement"].passed is False
    assert gates["agreement"].line() == "gate agreement: 97.1 % < 99.5 %"
    assert gates["closed_acc_drop"].line() == "gate closed_acc_drop: 2.5 points > 1.0 points"
    assert gates["mean_kl"].passed and gates["vision_cosine"].passed
    assert gates["mean_kl"].describe() == "mean_kl 0.0004 ≤ 0.01"
    assert [g.name for g in checks.failed(list(gates.values()))] == ["closed_acc_drop", "agreement"]


def test_gate_never_prints_a_failing_pair_as_equal_numbers():
    g = checks.evaluate_gates({"agreement": 0.99499}, CheckOptions(min_agreement=0.995))[1]
    assert g.passed is False and g.line() == "gate agreement: 99.499 % < 99.500 %"


def test_unmeasurable_gate_fails_and_null_gate_is_reported_only():
    opts = CheckOptions(max_closed_acc_drop=1.0, min_agreement=None)
    gates = {g.name: g for g in checks.evaluate_gates({"closed_acc_drop": None, "agreement": 0.5}, opts)}
    assert gates["closed_acc_drop"].passed is False
    assert gates["closed_acc_drop"].line() == "gate closed_acc_drop: not measurable on this evaluation split"
    assert gates["agreement"].passed is None and "not gated" in gates["agreement"].describe()


class _Fake:
    """A model stand-in whose outputs are fixed numpy arrays (tests the compare loop and metric wiring)."""

    def __init__(self, answers, logits, emb):
        self.answers, self.logits, self.emb = answers, logits, emb

    def answer(self, image, question, max_new_tokens=32):
        return self.answers[question]

    def first_token_logits(self, image, question):
        return self.logits[question]

    def image_embeddings(self, image):
        return self.emb


def test_compare_computes_metrics_from_both_models():
    from medlite.context import RunContext

    samples = [VqaSample(f"q{i}", f"question {i}", ans, "closed", f"img{i % 2}", image_fn=lambda: None)
               for i, ans in enumerate(["yes", "no", "left", "yes"])]
    ref_ans = {"question 0": "yes", "question 1": "no", "question 2": "left", "question 3": "yes"}
    cand_ans = {"question 0": "yes", "question 1": "yes", "question 2": "left", "question 3": "yes"}
    lg = {f"question {i}": np.array([0.0, 1.0, 2.0]) for i in range(4)}
    lq = dict(lg)
    lq["question 1"] = np.log([0.25, 0.25, 0.5])
    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    res = checks.compare(_Fake(ref_ans, lg, emb), _Fake(cand_ans, lq, np.array([[1.0, 0.0], [1.0, 1.0]])),
                         samples, CheckOptions(max_closed_acc_drop=10.0, min_agreement=0.7), RunContext(quiet=True))
    m = res.metrics
    assert m["source_closed_acc"] == 1.0 and m["artifact_closed_acc"] == 0.75 and m["closed_acc_drop"] == 25.0
    assert m["agreement"] == 0.75
    expected_kl = _kl_reference(np.array([0.0, 1.0, 2.0]), np.log([0.25, 0.25, 0.5])) / 4
    assert m["mean_kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert m["vision_cosine"] == pytest.approx((1 + math.sqrt(0.5)) / 2, rel=1e-5) and m["n_images"] == 2
    assert [g.name for g in checks.failed(res.gates)] == ["closed_acc_drop", "mean_kl", "vision_cosine"]
    assert [r["agree"] for r in res.rows] == [True, False, True, True]


def test_select_samples_is_even_and_deterministic():
    xs = list(range(100))
    assert checks.select_samples(xs, 5) == [0, 25, 50, 74, 99]
    assert checks.select_samples(xs, None) == xs and checks.select_samples(xs[:3], 10) == xs[:3]


def test_compare_metrics_tolerates_float_noise_only():
    assert checks.compare_metrics({"mean_kl": 0.001, "n": 10}, {"mean_kl": 0.0010000001, "n": 10}) == []
    assert checks.compare_metrics({"agreement": 0.99}, {"agreement": 0.95}) == ["agreement: recorded 0.99, now 0.95"]


def test_cosine_close_to_one_never_prints_as_one():
    g = checks.evaluate_gates({"vision_cosine": 0.99999997}, CheckOptions(min_vision_cosine=0.999))[3]
    assert g.describe() == "vision_cosine 0.99999997 ≥ 0.999"
