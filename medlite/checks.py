"""Accuracy gates: an artifact (through ``medlite.runtime.OnnxVlm``) against its uncompressed source.

Metrics, on the held-out evaluation split (never the calibration images):

* ``source_closed_acc`` / ``artifact_closed_acc`` and ``closed_acc_drop`` (points = percent of the
  closed questions), scored with :func:`medlite.evaluation.scoring.score`;
* ``agreement``: fraction of questions whose normalised answers are identical;
* ``mean_kl``: mean KL(source ‖ artifact) of the first answer token's distribution, in nats;
* ``vision_cosine``: mean over images of the mean per-token cosine of the projected image embeddings.

The math is plain numpy (:func:`kl_divergence`, :func:`mean_cosine`, :func:`agreement`) so it can be
tested against hand values; :func:`compare` runs any two objects with the ``answer`` /
``first_token_logits`` / ``image_embeddings`` methods of the runtime.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

# name -> (metric key, "max" | "min", display unit, recipe option)
GATES = {
    "closed_acc_drop": ("closed_acc_drop", "max", "points", "max_closed_acc_drop"),
    "agreement": ("agreement", "min", "%", "min_agreement"),
    "mean_kl": ("mean_kl", "max", "nats", "max_mean_kl"),
    "vision_cosine": ("vision_cosine", "min", "", "min_vision_cosine"),
}


# -- math -----------------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64 (``-inf`` logits allowed)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(P ‖ Q) in nats for logits of the same vocabulary (P = reference, Q = candidate).

    Tokens with zero probability under P contribute nothing (suppressed tokens at ``-inf`` in both);
    a token P allows but Q suppresses makes the divergence infinite.
    """
    p, q = np.asarray(p_logits), np.asarray(q_logits)
    if p.shape != q.shape:
        raise ValueError(f"logit shapes differ: {p.shape} vs {q.shape}")
    lp, lq = log_softmax(p), log_softmax(q)
    pp = np.exp(lp)
    mask = pp > 0
    with np.errstate(invalid="ignore"):
        terms = np.where(mask, pp * (lp - lq), 0.0)
    return float(max(np.sum(terms), 0.0))   # tiny negative rounding → 0


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of corresponding rows (tokens) of two ``[tokens, hidden]`` arrays.

    Two zero rows count as identical (1.0); one zero row against a non-zero row as 0.0.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"embedding shapes differ: {x.shape} vs {y.shape}")
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    dot = np.sum(x * y, axis=1)
    both_zero = (nx == 0) & (ny == 0)
    denom = np.where((nx == 0) | (ny == 0), 1.0, nx * ny)
    cos = np.where(both_zero, 1.0, dot / denom)
    return float(np.mean(cos))


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of pairs whose normalised answers are identical (scoring's normalisation)."""
    from medlite.evaluation.scoring import normalize

    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} answers")
    if not a:
        return float("nan")
    return sum(normalize(x) == normalize(y) for x, y in zip(a, b)) / len(a)


def sig(x: Optional[float], digits: int = 8) -> Optional[float]:
    """Round to ``digits`` significant digits: recorded metrics stay stable across runs whose last
    float bits differ (thread counts), and manifests stay byte-identical."""
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


# -- gates ----------------------------------------------------------------------------------------
@dataclass
class Gate:
    """One threshold applied to one metric. ``passed`` is None for an un-gated (null) threshold."""

    name: str
    value: Optional[float]
    threshold: Optional[float]
    kind: str            # "max": value must be ≤ threshold; "min": value must be ≥ threshold
    unit: str
    passed: Optional[bool]

    def _pair(self) -> tuple[str, str]:
        scale = 100.0 if self.unit == "%" else 1.0
        v = self.value * scale
        t = self.threshold * scale if self.threshold is not None else v
        # Fixed decimals for percentages/points, significant digits for KL and cosine; add digits
        # until a failing pair never prints as equal numbers ("99.5 % < 99.5 %").
        if self.unit in ("%", "points"):
            fmts = [f".{d}f" for d in (1, 2, 3, 4, 6)]
        elif self.unit == "nats":
            fmts = [f".{d}g" for d in (4, 6, 8, 10)]
        else:   # cosines live just below 1: "1" for 0.99996 would hide the difference
            fmts = [f".{d}g" for d in (6, 8, 10)]
        for f in fmts:
            vs, ts = format(v, f), format(t, f)
            pv, pt = float(vs), float(ts)
            # The printed numbers must compare like the real ones, and a cosine that is not 1 must
            # not print as 1.
            faithful = (pv == pt) == (v == t) and (pv <= pt) == (v <= t)
            if faithful and not (self.unit == "" and pv == 1.0 and v != 1.0):
                break
        u = f" {self.unit}" if self.unit in ("%", "points") else ""
        return vs + u, ts + u

    def describe(self) -> str:
        """``agreement 99.6 % ≥ 99.5 %`` (passed) / ``agreement 97.1 % < 99.5 %`` (failed)."""
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return f"{self.name}: not measurable on this evaluation split"
        if self.threshold is None:
            return f"{self.name} {self._pair()[0]} (not gated)"
        vs, ts = self._pair()
        if self.kind == "max":
            op = "≤" if self.passed else ">"
        else:
            op = "≥" if self.passed else "<"
        return f"{self.name} {vs} {op} {ts}"

    def line(self) -> str:
        """The one-line failure reason: ``gate agreement: 97.1 % < 99.5 %``."""
        d = self.describe()
        return f"gate {d}" if d.startswith(f"{self.name}:") else f"gate {self.name}: {d[len(self.name) + 1:]}"

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_gates(metrics: dict, options: Any) -> list[Gate]:
    """Apply the check stage's thresholds (``CheckOptions`` or any object with the same attributes)."""
    gates = []
    for name, (key, kind, unit, opt) in GATES.items():
        value, threshold = metrics.get(key), getattr(options, opt)
        measurable = value is not None and not (isinstance(value, float) and math.isnan(value))
        if threshold is None:
            passed = None
        elif not measurable:
            passed = False      # a gate that cannot be measured must not pass silently
        else:
            passed = value <= threshold if kind == "max" else value >= threshold
        gates.append(Gate(name, value if measurable else None, threshold, kind, unit, passed))
    return gates


def failed(gates: list[Gate]) -> list[Gate]:
    """The gates that failed."""
    return [g for g in gates if g.passed is False]


# -- running the comparison -----------------------------------------------------------------------
@dataclass
class CheckResult:
    """Metrics, per-question rows (for the report) and the evaluated gates."""

    metrics: dict
    rows: list[dict]
    gates: list[Gate]
    timings: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not failed(self.gates)


def compare(refs, candidate, samples: list, options: Any, ctx) -> CheckResult:
    """Run ``candidate`` (an object with the runtime's ``evaluate_rows(images, image_index, questions,
    max_new_tokens=)``) on ``samples`` and compare with the source's cached references ``refs``
    (:class:`medlite.pipeline.references.References` for the same samples).

    Questions run in batches of ``options.batch_size`` rows; each image is encoded once per batch.
    """
    import time

    from medlite.pipeline.references import row_batches, run_batch
    from medlite.evaluation.scoring import normalize

    pos = {q: i for i, q in enumerate(refs.qids)}
    cand: dict[str, tuple[str, float]] = {}
    cosines: dict[int, float] = {}
    bs = int(getattr(options, "batch_size", 16))
    t0 = time.perf_counter()
    with ctx.progress("check (artifact)", total=len(samples)) as advance:
        for batch in row_batches(samples, bs):
            answers, logits, embs = run_batch(candidate, batch, max_new_tokens=options.max_new_tokens)
            for (number, s), a, row in zip(batch, answers, logits):
                cand[str(s.qid)] = (a, kl_divergence(refs.logits[pos[str(s.qid)]], row))
                if number not in cosines:
                    cosines[number] = mean_cosine(_aligned(refs.embedding_of(s.qid), embs[number]), embs[number])
            advance(len(batch))
    seconds = time.perf_counter() - t0
    rows = []
    for s in samples:
        ra, (ca, kl) = refs.answers[pos[str(s.qid)]], cand[str(s.qid)]
        rows.append({"qid": str(s.qid), "image_id": s.image_id, "modality": s.modality,
                     "answer_type": s.answer_type, "question": s.question, "reference": str(s.answer),
                     "source": ra, "artifact": ca, "kl": sig(kl), "agree": normalize(ra) == normalize(ca)})
    metrics = _metrics(samples, rows, cosines)
    return CheckResult(metrics=metrics, rows=rows, gates=evaluate_gates(metrics, options),
                       timings={"artifact_seconds": round(seconds, 3),
                                "seconds_per_question": round(seconds / max(len(samples), 1), 5)})


def _aligned(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The source's image embeddings as the artifact's token count sees them: unchanged when the counts
    match; average-pooled over the same windows when a tokens stage pooled the artifact's image tokens
    (the cosine then says how far the reduced model's image embeddings are from the source's, window by window)."""
    ref = np.asarray(reference)
    if ref.shape[0] == np.asarray(candidate).shape[0]:
        return ref
    from medlite.image_tokens import pool_tokens

    return pool_tokens(ref, int(np.asarray(candidate).shape[0]))


def _metrics(samples: list, rows: list[dict], cosines: dict) -> dict:
    from medlite.evaluation.scoring import score

    ref_answers, cand_answers = [r["source"] for r in rows], [r["artifact"] for r in rows]
    kls = [r["kl"] for r in rows]
    src, art = score(ref_answers, samples), score(cand_answers, samples)
    sa, aa = src["closed_accuracy"], art["closed_accuracy"]
    return {
        "n": len(samples), "n_closed": src["n_closed"], "n_images": len(cosines),
        "source_closed_acc": sig(sa), "artifact_closed_acc": sig(aa),
        "closed_acc_drop": sig((sa - aa) * 100.0) if sa is not None and aa is not None else None,
        "source_open_recall": sig(src["open_recall"]), "artifact_open_recall": sig(art["open_recall"]),
        "agreement": sig(agreement(ref_answers, cand_answers)),
        "mean_kl": sig(float(np.mean(kls))) if kls else None,
        "max_kl": sig(float(np.max(kls))) if kls else None,
        "vision_cosine": sig(float(np.mean(list(cosines.values())))) if cosines else None,
        "min_vision_cosine": sig(float(np.min(list(cosines.values())))) if cosines else None,
    }


def compare_metrics(recorded: dict, now: dict, *, rel: float = 1e-3, abs_: float = 1e-4) -> list[str]:
    """Differences between recorded and re-measured metrics beyond float noise (for ``verify``)."""
    diffs = []
    for k in sorted(set(recorded) | set(now)):
        a, b = recorded.get(k), now.get(k)
        if a is None or b is None or isinstance(a, (str, bool)) or isinstance(b, (str, bool)):
            if a != b:
                diffs.append(f"{k}: recorded {a}, now {b}")
            continue
        if not math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_):
            diffs.append(f"{k}: recorded {a}, now {b}")
    return diffs
