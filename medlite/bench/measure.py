"""Latency and throughput of one model on this machine: ONNX Runtime for an artifact, PyTorch for a checkpoint.

Both backends answer the same (image, question) greedily and are timed the same way:

* ``image_encode_ms`` — pixels → projected image embeddings (vision graph / tower + projector);
* ``prefill_ms`` — the language model over the whole prompt (image tokens included), measured
  around the first decoder call only;
* ``ttft_ms`` — from the request (a decoded PIL image and the question) to the first answer token:
  preprocessing, vision, embeddings, prefill and the first argmax;
* ``decode_tokens_per_s`` — decode steps after the first token ÷ their wall time (embedding of the
  previous token, decoder step, argmax); ``decode_steps`` counts them. By default every timed run
  generates exactly ``max_new_tokens`` tokens, past the answer's end (as ``llama-bench``'s fixed
  token counts do): a short answer ("Yes") would otherwise leave one or two steps to time. With
  fewer than :data:`MIN_DECODE_STEPS` steps the figure is None ("not measured"), never a number
  read off one step;
* ``tokens`` — the answer's tokens (up to its first stop id / stop string; with ``ignore_eos``
  every generated token);
* ``followup_ttft_ms`` — ``ttft_ms`` of a second question on the same image with the image's
  prompt-prefix KV cache kept from the first (medlite/runtime/prefix_cache.py): preprocessing and
  the image hash, then a prefill of only the question and the template tail
  (``followup_prefill_tokens``); None where the runtime keeps no such cache (a checkpoint, a device
  bundle's engines).

Every figure is the median over ``runs`` timed runs after ``warmup`` untimed ones. Peak RSS is the
process's high-water mark (``getrusage``), so it includes loading the model.
"""
from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

MIN_DECODE_STEPS = 8      # fewer timed decode steps give no decode figure (one step is noise, not a rate)


@dataclass
class RunTimes:
    """One timed generation."""

    ttft_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int
    ids: list


@dataclass
class BenchResult:
    """What ``medlite bench`` reports (``to_dict`` is bench.json)."""

    model: str
    kind: str                         # "artifact" | "checkpoint"
    runtime: str
    precision: str
    question: str
    image: str
    prompt_tokens: int
    runs: int
    warmup: int
    max_new_tokens: int
    image_encode_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_tokens_per_s: Optional[float]   # None: fewer than MIN_DECODE_STEPS steps were timed
    decode_steps: int
    tokens: int
    answer: str
    peak_rss_bytes: int
    threads: int
    host: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    followup_ttft_ms: Optional[float] = None       # None: this runtime keeps no prefix cache
    followup_prefill_tokens: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def host_info() -> dict:
    """The machine the figures belong to."""
    import os

    from medlite.runtime.sessions import physical_cores

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(), "python": platform.python_version()}


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def summarize(runs: list[RunTimes]) -> dict:
    """Medians of the timed runs (every run generated the same ids: greedy and deterministic).

    ``decode_tokens_per_s`` is None below :data:`MIN_DECODE_STEPS` decode steps."""
    steps = runs[-1].decode_steps
    rate = [r.decode_steps / r.decode_s for r in runs if r.decode_steps >= MIN_DECODE_STEPS and r.decode_s > 0]
    return {"ttft_ms": statistics.median(r.ttft_s for r in runs) * 1e3,
            "prefill_ms": statistics.median(r.prefill_s for r in runs) * 1e3,
            "decode_tokens_per_s": statistics.median(rate) if rate else None,
            "decode_steps": steps, "tokens": len(runs[-1].ids)}


def answer_prefix(ids: list, stop_ids, stopped: Callable[[list], bool]) -> list:
    """The ids the answer ends with, as plain generation would stop: before the first stop id, or
    through the token after which ``stopped(ids)`` (a stop string appeared) first holds."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    ids = list(ids[:end])
    if not stopped(ids):
        return ids
    return next(ids[:k] for k in range(1, len(ids) + 1) if stopped(ids[:k]))


def timed_runs(one_run: Callable[[], RunTimes], runs: int, warmup: int, progress=None) -> list[RunTimes]:
    """``warmup`` untimed then ``runs`` timed generations; ``progress(n)`` after each."""
    out = []
    for i in range(warmup + runs):
        r = one_run()
        if i >= warmup:
            out.append(r)
        if progress:
            progress(1)
    return out


class StepClock:
    """Timestamps of the first decoder call (prefill) and of every generated token."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.prefill: Optional[float] = None
        self.stamps: list[float] = []

    def wrap_decoder(self, run):
        def timed(*a, **k):
            t = time.perf_counter()
            out = run(*a, **k)
            if self.prefill is None:
                self.prefill = time.perf_counter() - t
            return out
        return timed

    def token(self, *_a) -> None:
        self.stamps.append(time.perf_counter())

    def result(self, ids: list) -> RunTimes:
        s = self.stamps
        return RunTimes(ttft_s=s[0] - self.t0, prefill_s=self.prefill or 0.0, decode_s=s[-1] - s[0],
                        decode_steps=len(s) - 1, ids=list(ids))


__all__ = ["BenchResult", "MIN_DECODE_STEPS", "RunTimes", "StepClock", "answer_prefix", "host_info", "median_ms",
           "peak_rss_bytes", "summarize", "timed_runs"]
