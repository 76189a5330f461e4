"""Per-layer sensitivity of an INT8 graph and the fp16 fallback that makes the gates hold.

Measured on the calibration set's held-out slice (``CalibrationSet.heldout``: images never used to
calibrate, and never the evaluation split), on the exact Q/DQ graph ONNX Runtime runs:

* vision graph: ``1 - mean cosine`` of the projected image embeddings against the fp32 graph;
  the gate is the check stage's ``min_vision_cosine``;
* decoder graph: mean first-answer-token KL(fp32 ‖ int8) over the held-out prefill feeds, and the
  fraction of feeds whose first token (argmax) changes; gates ``max_mean_kl`` and ``min_agreement``.

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

    loss: float                      # 1 - cosine (vision) or mean KL in nats (decoder)
    cosine: Optional[float] = None
    mean_kl: Optional[float] = None
    top1_agreement: Optional[float] = None

    def to_dict(self) -> dict:
        from medlite.checks import sig

        return {k: sig(v, 6) for k, v in (("loss", self.loss), ("cosine", self.cosine), ("mean_kl", self.mean_kl),
                                          ("top1_agreement", self.top1_agreement)) if v is not None}


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
        if self.max_kl is not None and m.mean_kl is not None:
            ok &= m.mean_kl <= self.max_kl
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
        kls, same = [], []
        for r, o in zip(self.ref, outs):
            for i in range(r.shape[0]):
                kls.append(kl_divergence(r[i], o[i]))
                same.append(int(np.argmax(r[i]) == np.argmax(o[i])))
        kl = float(np.mean(kls))
        return GraphMetric(loss=kl, mean_kl=kl, top1_agreement=float(np.mean(same)))


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


__all__ = ["Fallback", "Gate", "GraphMetric", "HeldOut", "choose_fallback"]
