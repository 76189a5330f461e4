"""The source's reference outputs on the evaluation split, computed once and cached.

What every gate compares against: for each evaluation question the source's greedy answer and its
first-answer-token logits, and for each image the projected image embeddings. They are computed
before the first stage that changes weights (so a stage that damages the working model cannot make
the gates compare it with itself) and cached in ``<cache>/references/<key>.npz`` where the key
hashes the source's identity (file hashes), the evaluation questions and images, the generation
length and the versions of the libraries that compute them. A rebuild, ``verify`` or another recipe
on the same source and split reuses them; the source need not stay in memory afterwards.

Each image is encoded once for all of its questions, and its questions run as one left-padded batch
(:func:`medlite.checkpoints.generate.evaluate_rows`); a batch spans several images when they
have few questions each.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

FORMAT = "medlite-references/2"


def _stratum(s) -> tuple:
    qtype = dict(s.meta).get("question_type") or dict(s.meta).get("content_type") or ""
    return (s.modality, s.answer_type, str(qtype))


def select_samples(samples: list, max_samples: Optional[int]) -> list:
    """At most ``max_samples`` questions, stratified by modality × answer type × question type.

    Slots are allocated over the strata proportionally (at least one each while slots last, largest
    remainder), and inside a stratum spread evenly over its questions; never "the first N". The
    result keeps the input order. Deterministic.
    """
    from medlite.calibration.calibset import allocate

    if not max_samples or len(samples) <= max_samples:
        return list(samples)
    strata: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        strata.setdefault(_stratum(s), []).append(i)
    keys = {"|".join(k): k for k in strata}
    quota = allocate({name: len(strata[k]) for name, k in keys.items()}, max_samples)
    chosen: list[int] = []
    for name, n in quota.items():
        idx = strata[keys[name]]
        if n:
            chosen += [idx[int(round(j))] for j in np.linspace(0, len(idx) - 1, n)]
    return [samples[i] for i in sorted(set(chosen))]


def group_by_image(samples: list) -> "OrderedDict[tuple, list]":
    """Samples grouped by the image they ask about (:func:`~medlite.calibration.forward.image_key`),
    in first-seen order."""
    from medlite.calibration.forward import image_key

    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for s in samples:
        groups.setdefault(image_key(s), []).append(s)
    return groups


@dataclass
class References:
    """The source's outputs for a list of evaluation samples."""

    qids: list
    answers: list
    logits: np.ndarray                     # [n, vocab] float32
    image_index: list                      # per question: its image's row in ``embeddings``
    embeddings: np.ndarray                 # [n_images, n_img_tokens, hidden] float32
    key: str = ""
    cached: bool = False
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def embedding_of(self, qid: str) -> np.ndarray:
        """The image embeddings of the image question ``qid`` asks about."""
        return self.embeddings[self.image_index[self.qids.index(str(qid))]]

    @property
    def n_images(self) -> int:
        return int(self.embeddings.shape[0])


def references_key(identity: dict, samples: list, max_new_tokens: int, device=None) -> str:
    """Cache key: source identity + questions + images + generation length + library versions
    (+ the device type when it is not the CPU: GPU kernels give other numbers; CPU keys are unchanged)."""
    from medlite.artifacts import package_versions, sha256_json

    qs = [[str(s.qid), s.question, s.image_id, str(s.image_path or ""), s.modality] for s in samples]
    pk = package_versions(("medlite", "torch", "transformers", "tokenizers"))
    payload = {"format": FORMAT, "source": identity, "questions": qs, "max_new_tokens": max_new_tokens,
               "packages": pk}
    if device is not None and device.type != "cpu":
        payload["device"] = device.type
    return sha256_json(payload)[:24]


def row_batches(samples: list, batch_size: int) -> Iterator[list]:
    """Batches of ``(image number, sample)``: questions about one image stay together and a batch spans
    as many images as it takes to fill ``batch_size`` rows (one question per image still batches)."""
    batch: list = []
    for number, group in enumerate(group_by_image(samples).values()):
        for s in group:
            batch.append((number, s))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def run_batch(model, batch: list, *, max_new_tokens: int):
    """``model.evaluate_rows`` on one batch from :func:`row_batches`; returns ``(answers, logits,
    {image number: embeddings})``. Each image is loaded and encoded once per batch."""
    numbers = list(dict.fromkeys(n for n, _ in batch))
    images = [next(s for n, s in batch if n == k).load_image() for k in numbers]
    index = [numbers.index(n) for n, _ in batch]
    answers, logits, embs = model.evaluate_rows(images, index, [s.question for _, s in batch],
                                                max_new_tokens=max_new_tokens)
    return answers, logits, dict(zip(numbers, embs))


def answers_and_logits(model, samples: list, *, batch_size: int = 16, max_new_tokens: int = 16):
    """``(answers, first-token logits [n, vocab])`` of ``model`` (anything with ``evaluate_rows``: the ONNX
    runtime, a device stand-in) on ``samples``, in the samples' order; each image encoded once per batch."""
    import numpy as np

    where = {id(s): i for i, s in enumerate(samples)}
    answers, logits = [None] * len(samples), [None] * len(samples)
    for batch in row_batches(samples, batch_size):
        ans, lg, _ = run_batch(model, batch, max_new_tokens=max_new_tokens)
        for (_, s), a, row in zip(batch, ans, lg):
            answers[where[id(s)]], logits[where[id(s)]] = a, row
    return answers, np.stack(logits)


class _TorchRows:
    """The source model behind the runtime's ``evaluate_rows`` name."""

    def __init__(self, loaded):
        self.loaded = loaded

    def evaluate_rows(self, images, image_index, questions, *, max_new_tokens: int):
        from medlite.checkpoints.generate import evaluate_rows

        return evaluate_rows(self.loaded, images, image_index, questions, max_new_tokens=max_new_tokens)


def compute_references(loaded, samples: list, *, max_new_tokens: int, batch_size: int, ctx,
                       device=None) -> References:
    """Run the source on every sample (each image encoded once, questions batched), with progress.

    ``device`` (a GPU): the source model is moved there for the run and back to the host afterwards."""
    from medlite.devices import placed

    with placed(loaded.model, device):
        return _compute_references(loaded, samples, max_new_tokens=max_new_tokens, batch_size=batch_size, ctx=ctx)


def _compute_references(loaded, samples: list, *, max_new_tokens: int, batch_size: int, ctx) -> References:
    answers: dict[str, str] = {}
    logits: dict[str, np.ndarray] = {}
    image_of: dict[str, int] = {}
    embs: dict[int, np.ndarray] = {}
    model = _TorchRows(loaded)
    t0 = time.perf_counter()
    with ctx.progress("references (source model)", total=len(samples)) as advance:
        for batch in row_batches(samples, batch_size):
            a, lg, e = run_batch(model, batch, max_new_tokens=max_new_tokens)
            embs.update(e)
            for (number, s), ans, row in zip(batch, a, lg):
                answers[str(s.qid)], logits[str(s.qid)], image_of[str(s.qid)] = ans, row, number
            advance(len(batch))
    qids = [str(s.qid) for s in samples]
    return References(qids, [answers[q] for q in qids], np.stack([logits[q] for q in qids]).astype(np.float32),
                      [image_of[q] for q in qids], np.stack([embs[k] for k in sorted(embs)]).astype(np.float32),
                      seconds=time.perf_counter() - t0)


def _cache_file(ctx, key: str) -> Path:
    return Path(ctx.cache_dir) / "references" / f"{key}.npz"


def save_references(refs: References, path: Path) -> None:
    """Write atomically (a concurrent build never reads half a file)."""
    from medlite.fileio import write_bytes_atomic

    meta = {"format": FORMAT, "qids": refs.qids, "answers": refs.answers, "image_index": refs.image_index}
    buf = io.BytesIO()
    np.savez(buf, logits=refs.logits, embeddings=refs.embeddings, meta=np.frombuffer(
        json.dumps(meta).encode(), dtype=np.uint8))
    write_bytes_atomic(path, buf.getvalue())


def load_references(path: Path, samples: list) -> Optional[References]:
    """Cached references for exactly ``samples`` (None when absent, unreadable or for other questions)."""
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            logits, embeddings = z["logits"], z["embeddings"]
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("format") != FORMAT or meta.get("qids") != [str(s.qid) for s in samples]:
        return None
    return References(meta["qids"], meta["answers"], logits, meta["image_index"], embeddings, cached=True)


def references_for(loaded_fn, identity: dict, samples: list, *, max_new_tokens: int, batch_size: int,
                   ctx, device=None) -> References:
    """Cached references, or computed with ``loaded_fn()`` (the source model, on ``device``) and cached."""
    key = references_key(identity, samples, max_new_tokens, device)
    path = _cache_file(ctx, key)
    refs = load_references(path, samples)
    if refs is None:
        refs = compute_references(loaded_fn(), samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  ctx=ctx, device=device)
        try:
            save_references(refs, path)
        except OSError as e:   # a read-only cache only costs the recomputation next time
            ctx.warn(f"could not cache the source's references in {path.parent}: {e}")
    refs.key = key
    return refs


def reference_digest(refs: References) -> str:
    """sha256 of the reference numbers (answers, logits, embeddings) for the manifest."""
    h = hashlib.sha256()
    h.update(json.dumps([refs.qids, refs.answers]).encode())
    h.update(np.ascontiguousarray(refs.logits).tobytes())
    h.update(np.ascontiguousarray(refs.embeddings).tobytes())
    return h.hexdigest()
