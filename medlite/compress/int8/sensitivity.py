"""Per-layer sensitivity of an INT8 graph and the fp16 fallback that makes the gates hold.

Measured on the calibration set's held-out slice (``CalibrationSet.heldout``: images never used to
calibrate, and never the evaluation split), on the exact Q/DQ graph ONNX Runtime runs:

* vision graph: ``1 - mean cosine`` of the projected image embeddings against the fp32 graph;
  the gate is the check stage's ``min_vision_cosine``;
* decoder graph: first-answer-token metrics over the held-out prefill feeds (:func:`answer_metrics`):
  the **tie KL** (below), the plain mean KL(fp32 ‖ int8) and the fraction of feeds whose first token
  (argmax) changes; gates ``sensitivity_max_kl`` (on the tie KL) and ``min_agreement``.

Why the tie KL: an answer flips iff INT8 shifts the gap between the fp32 source's top-2 first tokens
by more than that gap. The shift δ itself can be measured on any question, but the plain KL of a
confident answer is squashed by its softmax (≈ p(1-p)·δ²/2 for two tokens), and the held-out slice
— train-split images the model has learnt — is confident: on the demo model its mean KL is ~4x
smaller than the same shifts would cost at a tie, which is why the old criterion kept no layer while
the evaluation's near ties flipped. ``tie_kl`` = mean δ²/8, the KL a two-way *tie* shifted by δ has,
so the target keeps its meaning (1e-4 nats ≈ a 0.03-logit shift of a near tie) on any held-out set.

Score of a layer = the metric with *only that layer* quantized (one at a time). The fallback keeps
layers in fp16, most sensitive first, until the full graph's metric passes the gate or
``max_fp16_layers`` is reached (greedy; every step is one re-quantization with the cached ranges
and one held-out run).

Stopping rule: the tie KL is a mean of heavy-tailed per-row values (one row with |δ| = 0.3 weighs as
much as a hundred typical ones), so its point estimate on ~128 rows is noisy and, after a greedy
search that stops at the first estimate under the target, optimistic (measured on the demo model:
6.7e-5 on the pass's rows, 8.7e-5 .. 1.08e-4 on unseen held-out pairs). The gate therefore reads a
one-sided **upper confidence bound** of the mean (:func:`upper_mean_bound`, Student t at the recipe's
``sensitivity_confidence``): a graph passes only when the target holds with that confidence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

DEFAULT_CONFIDENCE = 0.9   # QuantizeOptions.sensitivity_confidence's default (chosen on the held-out slice)


def t_quantile(p: float, dof: float) -> float:
    """Quantile ``p`` of Student's t with ``dof`` degrees of freedom, without scipy: the normal quantile
    and its Cornish-Fisher expansion in 1/dof (Abramowitz & Stegun 26.7.5; < 1e-3 relative for
    dof >= 5 and 0.5 < p <= 0.995, tested against scipy.stats.t)."""
    from statistics import NormalDist

    x = NormalDist().inv_cdf(p)
    g = ((x ** 3 + x) / 4,
         (5 * x ** 5 + 16 * x ** 3 + 3 * x) / 96,
         (3 * x ** 7 + 19 * x ** 5 + 17 * x ** 3 - 15 * x) / 384,
         (79 * x ** 9 + 776 * x ** 7 + 1482 * x ** 5 - 1920 * x ** 3 - 945 * x) / 92160)
    return float(x + sum(gi / dof ** (i + 1) for i, gi in enumerate(g)))


def upper_mean_bound(values, confidence: float) -> float:
    """One-sided upper confidence bound of the mean of ``values``: mean + t(confidence, n-1)·s/√n
    (s the sample standard deviation). With one value there is no spread to estimate: the value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        return float(v.mean()) if v.size else float("nan")
    return float(v.mean() + t_quantile(confidence, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))


@dataclass
class GraphMetric:
    """The held-out metric of one quantized graph (smaller ``loss`` = closer to fp32)."""

    loss: float                      # 1 - cosine (embedding only) or the tie KL in nats (answer token)
    cosine: Optional[float] = None
    mean_kl: Optional[float] = None
    top1_agreement: Optional[float] = None
    tie_kl: Optional[float] = None   # mean δ²/8, δ = shift of the fp32 top-2 first-token gap
    tie_rows: Optional[np.ndarray] = field(default=None, repr=False)   # per-row δ²/8 (tie_kl = their mean)
    tie_kl_upper: Optional[float] = None   # one-sided upper bound of tie_kl at ``confidence`` (the gate reads it)
    confidence: Optional[float] = None

    def with_bound(self, confidence: Optional[float]) -> "GraphMetric":
        """Set ``tie_kl_upper`` at ``confidence`` from the per-row values (None: the point estimate rules)."""
        if confidence is not None and self.tie_rows is not None:
            self.tie_kl_upper, self.confidence = upper_mean_bound(self.tie_rows, confidence), float(confidence)
        return self

    def to_dict(self) -> dict:
        from medlite.checks import sig

        rows = None if self.tie_rows is None else int(np.size(self.tie_rows))
        return {k: (sig(v, 6) if isinstance(v, float) else v)
                for k, v in (("loss", self.loss), ("cosine", self.cosine), ("mean_kl", self.mean_kl),
                             ("tie_kl", self.tie_kl), ("tie_kl_upper", self.tie_kl_upper),
                             ("confidence", self.confidence), ("rows", rows), ("top1_agreement", self.top1_agreement))
                if v is not None}


@dataclass
class Gate:
    """Thresholds a graph's metric must meet (from the recipe's check stage)."""

    min_cosine: Optional[float] = None
    max_kl: Optional[float] = None
    min_top1: Optional[float] = None

    def holds(self, m: GraphMetric) -> bool:
        ok = True
        if self.min_cosine is not None and m.cosine is not None:
            ok &= m.cosine >= self.min_cosine
        # the upper confidence bound when the metric has one, else the point estimate
        kl = next((x for x in (m.tie_kl_upper, m.tie_kl, m.mean_kl) if x is not None), None)
        if self.max_kl is not None and kl is not None:
            ok &= kl <= self.max_kl
        if self.min_top1 is not None and m.top1_agreement is not None:
            ok &= m.top1_agreement >= self.min_top1
        return bool(ok)


@dataclass
class Fallback:
    """What the sensitivity pass chose for one graph."""

    metric_all: GraphMetric                     # every target quantized
    metric_final: GraphMetric                   # with ``kept_fp16`` excluded
    scores: dict = field(default_factory=dict)  # layer -> loss with only that layer quantized
    kept_fp16: list = field(default_factory=list)
    gate_holds: bool = True
    steps: int = 0
    confidence: Optional[float] = None          # of the tie-KL upper bound the gate read (None: point estimate)
    target: Optional[float] = None              # the gate's tie-KL target

    def to_dict(self) -> dict:
        from medlite.checks import sig

        rule = ("point estimate" if self.confidence is None else
                f"upper {self.confidence:g} confidence bound (Student t over rows)")
        return {"metric_all_int8": self.metric_all.to_dict(), "metric_final": self.metric_final.to_dict(),
                "scores": {k: sig(v, 4) for k, v in self.scores.items()}, "kept_fp16": list(self.kept_fp16),
                "gate_holds": self.gate_holds, "steps": self.steps, "confidence": self.confidence,
                "target_tie_kl": None if self.target is None else sig(self.target, 6), "stopping_rule":
                f"tie KL {rule} <= target"}


class HeldOut:
    """fp32 reference outputs of one graph on held-out feeds, and the metric of a candidate graph."""

    def __init__(self, graph: str, ref_path: Path, feeds: Sequence[dict]):
        self.graph, self.feeds = graph, list(feeds)
        self.ref = [self._run(ref_path, f) for f in self.feeds]

    @staticmethod
    def _session(path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        # Q/DQ evaluated as written (dequantize, float math) = the integer math TensorRT runs. ORT's
        # fused int8 CPU kernels on AVX2 without VNNI saturate int16 partial sums (measured on the
        # tiny vision graph: 2.4 % relative error vs 3e-7 for the fake-quant reference).
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def _run(self, path_or_sess, feed: dict) -> np.ndarray:
        sess = path_or_sess if not isinstance(path_or_sess, (str, Path)) else self._session(path_or_sess)
        out = sess.get_outputs()[0].name
        (y,) = sess.run([out], feed)
        return y[:, -1, :].astype(np.float64) if self.graph == "decoder" else y.astype(np.float64)

    def metric(self, path: Path) -> GraphMetric:
        from medlite.checks import kl_divergence, mean_cosine

        sess = self._session(path)
        outs = [self._run(sess, f) for f in self.feeds]
        if self.graph != "decoder":
            cos = float(np.mean([mean_cosine(r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1]))
                                 for r, o in zip(self.ref, outs)]))
            return GraphMetric(loss=1.0 - cos, cosine=cos)
        return answer_metrics(self.ref, outs)


def answer_metrics(ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], *, cosine: Optional[float] = None
                   ) -> GraphMetric:
    """First-answer-token metric of candidate logits against reference logits (lists of ``[rows, vocab]``).

    ``tie_kl`` (the loss) = mean δ²/8 with δ the change of the gap between the reference's top-2
    tokens (see the module docstring), its per-row values in ``tie_rows``; ``mean_kl`` = mean
    KL(ref ‖ cand); ``top1_agreement`` = the fraction of rows whose argmax is unchanged.
    """
    from medlite.checks import kl_divergence

    r = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1]) for x in ref])
    c = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1]) for x in cand])
    rows = np.arange(r.shape[0])
    top2 = np.argsort(-r, axis=1, kind="stable")[:, :2]
    delta = (r[rows, top2[:, 0]] - r[rows, top2[:, 1]]) - (c[rows, top2[:, 0]] - c[rows, top2[:, 1]])
    per_row = delta ** 2 / 8.0
    tie = float(np.mean(per_row))
    kl = float(np.mean([kl_divergence(a, b) for a, b in zip(r, c)]))
    return GraphMetric(loss=tie, mean_kl=kl, tie_kl=tie, top1_agreement=float(np.mean(r.argmax(1) == c.argmax(1))),
                       cosine=cosine, tie_rows=per_row)


def choose_fallback(layers: Sequence[str], measure: Callable[[Sequence[str]], GraphMetric], gate: Gate, *,
                    max_fp16: int, scores_wanted: bool = True, confidence: Optional[float] = DEFAULT_CONFIDENCE,
                    ctx=None) -> Fallback:
    """Greedy fp16 fallback. ``measure(excluded_layers)`` quantizes every layer but those and returns
    the held-out metric. Per-layer scores come from quantizing one layer at a time (point estimates:
    they only rank); the gate reads each full-graph metric's tie-KL upper bound at ``confidence``
    (None: the point estimate, the old rule)."""
    layers = list(layers)
    full = measure([]).with_bound(confidence)
    fb = Fallback(metric_all=full, metric_final=full, gate_holds=gate.holds(full), steps=1,
                  confidence=confidence if full.tie_kl_upper is not None else None, target=gate.max_kl)
    if fb.gate_holds and not scores_wanted:
        return fb
    for i, layer in enumerate(layers):
        fb.scores[layer] = measure([x for x in layers if x != layer]).loss
        fb.steps += 1
    if fb.gate_holds or max_fp16 <= 0:
        return fb
    order = sorted(layers, key=lambda k: (-fb.scores[k], k))
    for layer in order[:max_fp16]:
        fb.kept_fp16.append(layer)
        if len(fb.kept_fp16) == len(layers):
            break
        fb.metric_final = measure(fb.kept_fp16).with_bound(confidence)
        fb.steps += 1
        if gate.holds(fb.metric_final):
            fb.gate_holds = True
            break
    if ctx is not None and not fb.gate_holds:
        ctx.warn(f"sensitivity fallback: the held-out gate still fails with {len(fb.kept_fp16)} layer(s) in fp16 "
                 f"(max_fp16_layers {max_fp16}): {fb.metric_final.to_dict()}")
    return fb


__all__ = ["DEFAULT_CONFIDENCE", "Fallback", "Gate", "GraphMetric", "HeldOut", "answer_metrics", "choose_fallback",
           "t_quantile", "upper_mean_bound"]
