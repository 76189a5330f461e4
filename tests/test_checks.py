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
    """A candidate whose ``evaluate`` returns fixed numpy arrays (tests the compare loop and metric wiring)."""

    def __init__(self, answers, logits, emb):
        self.answers, self.logits, self.emb, self.calls = answers, logits, emb, []

    def evaluate_rows(self, images, image_index, questions, max_new_tokens=16):
        self.calls.append(list(questions))
        return ([self.answers[q] for q in questions], np.stack([self.logits[q] for q in questions]),
                np.stack([self.emb] * len(images)))


def test_compare_computes_metrics_against_references():
    from medlite.pipeline.references import References
    from medlite.context import RunContext

    views = [lambda: None, lambda: None]      # two images: questions 0, 2 ask about one, 1, 3 the other
    samples = [VqaSample(f"q{i}", f"question {i}", ans, "closed", "one-source", image_fn=views[i % 2])
               for i, ans in enumerate(["yes", "no", "left", "yes"])]
    ref_ans = ["yes", "no", "left", "yes"]
    cand_ans = {"question 0": "yes", "question 1": "yes", "question 2": "left", "question 3": "yes"}
    lg = np.array([[0.0, 1.0, 2.0]] * 4)
    lq = {f"question {i}": lg[i] for i in range(4)}
    lq["question 1"] = np.log([0.25, 0.25, 0.5])
    refs = References([s.qid for s in samples], ref_ans, lg, [0, 1, 0, 1],
                      np.stack([np.array([[1.0, 0.0], [0.0, 1.0]])] * 2))
    fake = _Fake(cand_ans, lq, np.array([[1.0, 0.0], [1.0, 1.0]]))
    res = checks.compare(refs, fake, samples, CheckOptions(max_closed_acc_drop=10.0, min_agreement=0.7, batch_size=1),
                         RunContext(quiet=True))
    m = res.metrics
    assert m["source_closed_acc"] == 1.0 and m["artifact_closed_acc"] == 0.75 and m["closed_acc_drop"] == 25.0
    assert m["agreement"] == 0.75
    expected_kl = _kl_reference(np.array([0.0, 1.0, 2.0]), np.log([0.25, 0.25, 0.5])) / 4
    assert m["mean_kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert m["vision_cosine"] == pytest.approx((1 + math.sqrt(0.5)) / 2, rel=1e-5) and m["n_images"] == 2
    assert [g.name for g in checks.failed(res.gates)] == ["closed_acc_drop", "mean_kl", "vision_cosine"]
    assert [r["agree"] for r in res.rows] == [True, False, True, True]
    # questions grouped by image (each image's questions together), batch_size 1 here
    assert fake.calls == [["question 0"], ["question 2"], ["question 1"], ["question 3"]]
    fake.calls.clear()
    checks.compare(refs, fake, samples, CheckOptions(batch_size=3), RunContext(quiet=True))
    assert fake.calls == [["question 0", "question 2", "question 1"], ["question 3"]]   # batches span images


def test_select_samples_is_stratified_and_deterministic():
    from medlite.pipeline.references import select_samples

    samples = [VqaSample(f"q{i}", f"q {i}", "yes", "closed" if i % 4 else "open", f"img{i}",
                         modality=("CT", "MR", "US")[i % 3]) for i in range(120)]
    picked = select_samples(samples, 12)
    assert len(picked) == 12 and picked == select_samples(list(samples), 12)
    strata = {(s.modality, s.answer_type) for s in picked}
    assert strata == {(s.modality, s.answer_type) for s in samples}        # every stratum represented
    assert picked != samples[:12]                                            # never "the first N"
    assert [samples.index(s) for s in picked] == sorted(samples.index(s) for s in picked)
    assert select_samples(samples, None) == samples and select_samples(samples[:3], 10) == samples[:3]


def test_compare_metrics_tolerates_float_noise_only():
    assert checks.compare_metrics({"mean_kl": 0.001, "n": 10}, {"mean_kl": 0.0010000001, "n": 10}) == []
    assert checks.compare_metrics({"agreement": 0.99}, {"agreement": 0.95}) == ["agreement: recorded 0.99, now 0.95"]


def test_cosine_close_to_one_never_prints_as_one():
    g = checks.evaluate_gates({"vision_cosine": 0.99999997}, CheckOptions(min_vision_cosine=0.999))[3]
    assert g.describe() == "vision_cosine 0.99999997 ≥ 0.999"
