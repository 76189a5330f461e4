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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np


@dataclass
class GraphMetric:
    """The held-out metric of one quantized graph (smaller ``loss`` = closer to fp32)."""

    loss: float                      # 1 - cosine (embedding only) or the tie KL in nats (answer token)
    cosine: Optional[float] = None
    mean_kl: Optional[float] = None
    top1_agreement: Optional[float] = None
    tie_kl: Optional[float] = None   # mean δ²/8, δ = shift of the fp32 top-2 first-token gap

    def to_dict(self) -> dict:
        from medlite.checks import sig

        return {k: sig(v, 6) for k, v in (("loss", self.loss), ("cosine", self.cosine), ("mean_kl", self.mean_kl),
                                          ("tie_kl", self.tie_kl), ("top1_agreement", self.top1_agreement))
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
        kl = m.tie_kl if m.tie_kl is not None else m.mean_kl
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

    def to_dict(self) -> dict:
        from medlite.checks import sig

        return {"metric_all_int8": self.metric_all.to_dict(), "metric_final": self.metric_final.to_dict(),
                "scores": {k: sig(v, 4) for k, v in self.scores.items()}, "kept_fp16": list(self.kept_fp16),
                "gate_holds": self.gate_holds, "steps": self.steps}


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
    tokens (see the module docstring); ``mean_kl`` = mean KL(ref ‖ cand); ``top1_agreement`` = the
    fraction of rows whose argmax is unchanged.
    """
    from medlite.checks import kl_divergence

    r = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1]) for x in ref])
    c = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1]) for x in cand])
    rows = np.arange(r.shape[0])
    top2 = np.argsort(-r, axis=1, kind="stable")[:, :2]
    delta = (r[rows, top2[:, 0]] - r[rows, top2[:, 1]]) - (c[rows, top2[:, 0]] - c[rows, top2[:, 1]])
    tie = float(np.mean(delta ** 2) / 8.0)
    kl = float(np.mean([kl_divergence(a, b) for a, b in zip(r, c)]))
    return GraphMetric(loss=tie, mean_kl=kl, tie_kl=tie, top1_agreement=float(np.mean(r.argmax(1) == c.argmax(1))),
                       cosine=cosine)


def choose_fallback(layers: Sequence[str], measure: Callable[[Sequence[str]], GraphMetric], gate: Gate, *,
                    max_fp16: int, scores_wanted: bool = True, ctx=None) -> Fallback:
    """Greedy fp16 fallback. ``measure(excluded_layers)`` quantizes every layer but those and returns
    the held-out metric. Per-layer scores come from quantizing one layer at a time."""
    layers = list(layers)
    full = measure([])
    fb = Fallback(metric_all=full, metric_final=full, gate_holds=gate.holds(full), steps=1)
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
        fb.metric_final = measure(fb.kept_fp16)
        fb.steps += 1
        if gate.holds(fb.metric_final):
            fb.gate_holds = True
            break
    if ctx is not None and not fb.gate_holds:
        ctx.warn(f"sensitivity fallback: the held-out gate still fails with {len(fb.kept_fp16)} layer(s) in fp16 "
                 f"(max_fp16_layers {max_fp16}): {fb.metric_final.to_dict()}")
    return fb


__all__ = ["Fallback", "Gate", "GraphMetric", "HeldOut", "answer_metrics", "choose_fallback"]
