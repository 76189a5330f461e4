"""Follow-up questions on one image: the KV cache of the prompt's fixed prefix, kept and reused (issue 31).

A clinician asks several questions about one scan. Every prompt starts with the same tokens — BOS,
the system prompt, ``USER:``, the image's ``num_image_tokens`` embeddings and the newline before the
question (everything of the chat-templated prompt up to where the question text starts) — so their
keys and values are the same every time. The first question is prefilled whole, as without the
cache, and the first ``1 + P`` slots of its ``present`` tensors (the dummy slot and the ``P`` prefix
tokens) are kept. A follow-up on the same image then runs neither the vision graph nor those ``P``
tokens: its prefill feeds only the question and the template tail with ``past`` = the kept slots::

    slot:      0        1 .. P            P+1 .. P+R          (R = the follow-up's remaining tokens)
    mask:      0        1                 1
    position:  -        0 .. P-1          P .. P+R-1

which is the decoder graph's own contract for a decode step (query ``i`` sits in slot ``past + i``
and reads every unmasked slot up to its own; docs/export.md), so the answer's greedy ids are the
cold run's (tests/runtime/test_prefix_cache.py).

Cache key: the session (``scope``: a ``serve`` client's session, None for ``ask`` / ``bench``), the
image's content hash (sha256 of the preprocessed pixels: the frame and window the model sees) and
the prefix token ids. Bound: ``max_bytes`` over all entries (default :data:`DEFAULT_MAX_BYTES`),
least recently used evicted first; an entry larger than the bound is not kept. A scope that asks
about a new image drops its entries for other images. numpy only (no torch); Python 3.8 syntax.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import numpy as np

from medlite.prompting import encode_prompt, expand_image_tokens
from medlite.runtime.decoding import KvState, prefill_inputs

DEFAULT_MAX_BYTES = 512 * 1000 ** 2      # 512 MB (decimal): 14 sessions of a TinyLlama-1.1B-shaped model, fp32 KV
_MARK = "\ue000"                         # a private-use character: where the question goes in the template


def image_key(pixels: np.ndarray) -> str:
    """sha256 of the preprocessed pixels (dtype and shape included): equal only for what the model sees."""
    h = hashlib.sha256(f"{pixels.dtype.str}{tuple(pixels.shape)}".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def template_head_ids(vlm) -> list:
    """Prompt ids of the chat template up to where the question starts (image tokens expanded)."""
    c = vlm.config
    head = c.template.render(_MARK).split(_MARK)[0]
    return expand_image_tokens(encode_prompt(vlm.tokenizer, head, image_token_id=c.image_token_id,
                                             bos_token_id=c.bos_token_id), c.image_token_id, c.num_image_tokens)


def fixed_prefix_length(vlm, ids: Sequence[int], head: Optional[Sequence[int]] = None) -> int:
    """How many leading tokens of the prompt ``ids`` come before the question (0: nothing to reuse).

    The template is rendered with a marker in the question's place and tokenized up to it; the prefix
    is the part of that which ``ids`` starts with (so a tokenizer that merges the newline with the
    question's first word only shortens it). It must hold every image token — a template that puts the
    image after the question reuses nothing — and leave at least one token to prefill. ``head``: the
    :func:`template_head_ids` already computed.
    """
    n = 0
    for a, b in zip(template_head_ids(vlm) if head is None else head, ids):
        if a != b:
            break
        n += 1
    n = min(n, len(ids) - 1)
    image = vlm.config.image_token_id
    if n <= 0 or sum(1 for t in ids[:n] if t == image) != sum(1 for t in ids if t == image):
        return 0
    return n


class PrefixCache:
    """Kept prompt-prefix KV caches, bounded by ``max_bytes`` (least recently used evicted first).

    Thread-safe. ``stats()`` counts hits, misses, entries kept, evictions (``evicted_lru`` for the
    bound, ``evicted_new_image`` when a scope moved to another image) and entries too big to keep.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if int(max_bytes) < 0:
            raise ValueError(f"max_bytes {max_bytes} is negative")
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()   # key -> (past arrays, nbytes)
        self._bytes = 0
        self._lock = threading.Lock()
        self._counts = dict(hits=0, misses=0, stored=0, evicted_lru=0, evicted_new_image=0, too_big=0)
        self._head: tuple = (None, None, [])    # (tokenizer, config, template_head_ids): tokenized once

    # -- storage --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held now (the kept arrays)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: tuple, counter: str) -> None:
        _, size = self._entries.pop(key)
        self._bytes -= size
        self._counts[counter] += 1

    def lookup(self, scope, image: str, prefix: Sequence[int]) -> Optional[list]:
        """The kept ``past`` for ``(scope, image, prefix)`` or None; the scope's other images are dropped."""
        key = (scope, image, tuple(prefix))
        with self._lock:
            for other in [k for k in self._entries if k[0] == scope and k[1] != image]:
                self._drop(other, "evicted_new_image")
            hit = self._entries.get(key)
            if hit is None:
                self._counts["misses"] += 1
                return None
            self._entries.move_to_end(key)
            self._counts["hits"] += 1
            return list(hit[0])

    def store(self, scope, image: str, prefix: Sequence[int], past: Sequence[np.ndarray]) -> bool:
        """Keep ``past`` (copied); evicts least recently used entries to stay within ``max_bytes``."""
        size = int(sum(p.nbytes for p in past))
        key = (scope, image, tuple(prefix))
        with self._lock:
            if key in self._entries:          # a replacement (two misses raced): not an eviction
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                self._counts["too_big"] += 1
                return False
            while self._entries and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)), "evicted_lru")
            self._entries[key] = ([np.array(p, copy=True, order="C") for p in past], size)
            self._bytes += size
            self._counts["stored"] += 1
            return True

    def drop_scope(self, scope) -> int:
        """Forget every entry of ``scope`` (a session that ended); returns how many."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == scope]
            for k in keys:
                _, size = self._entries.pop(k)
                self._bytes -= size
            return len(keys)

    def stats(self) -> dict:
        """Counters, entries and bytes held, and the bound."""
        with self._lock:
            return dict(self._counts, entries=len(self._entries), bytes=self._bytes, max_bytes=self.max_bytes)

    # -- generation -----------------------------------------------------------------------
    def first_inputs(self, vlm, image, question: str, *, scope=None, max_new_tokens: int = 0):
        """``(first, run_decoder, info)`` for :func:`medlite.runtime.decoding.greedy_generate` (batch 1).

        On a hit ``first`` holds only the question's remaining tokens after the kept prefix; on a miss the
        whole prompt (the vision graph runs) and ``run_decoder`` keeps the prefix's slots of its first
        ``present``. ``info``: ``prefill_tokens`` (tokens the first decoder call runs), ``cached_tokens``
        (reused) and ``cache`` (``hit`` / ``miss`` / ``off`` when the template leaves nothing to reuse).
        """
        ids = vlm.check_request([question], max_new_tokens)[0]     # before any graph runs
        pixels = vlm._pixels([image])
        key = image_key(pixels)
        tok, cfg, head = self._head
        if tok is not vlm.tokenizer or cfg is not vlm.config:
            head = template_head_ids(vlm)
            self._head = (vlm.tokenizer, vlm.config, head)
        p = fixed_prefix_length(vlm, ids, head)
        past = self.lookup(scope, key, ids[:p]) if p else None
        if past is not None:
            return self._warm(vlm, ids, p, past), vlm._decoder, \
                {"prefill_tokens": len(ids) - p, "cached_tokens": p, "cache": "hit"}
        m = vlm.config.model
        slots = int(vlm.config.kv_cache["prefill_past_slots"])
        first = prefill_inputs([vlm._prompt_embeds(ids, vlm._vision_pixels(pixels)[0])],
                               num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"], head_dim=m["head_dim"],
                               dtype=vlm._kv_dtype, prefill_slots=slots)
        info = {"prefill_tokens": len(ids), "cached_tokens": 0, "cache": "miss" if p else "off"}
        if not p:
            return first, vlm._decoder, info
        return first, self._keeping(vlm._decoder, scope, key, ids[:p], slots + p), info

    @staticmethod
    def _warm(vlm, ids: Sequence[int], p: int, past: list):
        """Inputs of the follow-up's prefill: the remaining tokens at positions ``p ..``, past = the prefix."""
        rest = np.asarray(ids[p:], dtype=np.int32)
        x = vlm._embed(rest[None])
        slots = int(past[0].shape[2])
        mask = np.zeros((1, slots + len(rest)), dtype=np.int32)
        mask[:, slots - p:] = 1           # the dummy slot(s) before the prefix stay blocked
        pos = np.arange(p, len(ids), dtype=np.int32)[None]
        state = KvState(mask=mask, next_pos=np.asarray([len(ids)], dtype=np.int32), past=past)
        return x, pos, state

    def _keeping(self, run: Callable, scope, key: str, prefix: Sequence[int], slots: int) -> Callable:
        """``run`` that keeps the first ``slots`` slots of its first call's ``present`` (``store`` copies them
        at once: the bound decoder reuses its output buffers)."""
        done: list = []

        def keeping(x, mask, pos, past):
            logits, present = run(x, mask, pos, past)
            if not done:
                done.append(True)
                self.store(scope, key, prefix, [t[:, :, :slots] for t in present])
            return logits, present

        return keeping

    def generate(self, vlm, image, question: str, *, scope=None, max_new_tokens: int = 32,
                 on_step: Optional[Callable] = None):
        """Greedy answer ids of one question (stop ids excluded) and the prefill ``info``."""
        first, run, info = self.first_inputs(vlm, image, question, scope=scope, max_new_tokens=max_new_tokens)
        (ids,) = vlm._greedy(first, run=run, max_new_tokens=max_new_tokens, on_step=on_step)
        return ids, info


__all__ = ["DEFAULT_MAX_BYTES", "PrefixCache", "fixed_prefix_length", "image_key", "template_head_ids"]
