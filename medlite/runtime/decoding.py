"""Greedy decoding over the decoder graph's KV cache (numpy only).

Batch layout (left padding, the dummy-slot convention of ``medlite_runtime.json``)::

    slot:      0        1 .. L-n_i        L-n_i+1 .. L      L+1, L+2, ...
    content:   dummy    padding           prompt tokens      generated tokens
    mask:      0        0                 1                  1
    position:  -        0 (unused)        0 .. n_i-1         n_i, n_i+1, ...

The dummy slot (zeros, mask 0) exists because TensorRT 8.5 handles zero-length KV inputs badly;
with it, prefill and decode run through one graph. Masked slots get an additive -1e4 inside the
graph, whose exp is exactly 0, so the dummy slot and padding change no logit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


@dataclass
class KvState:
    """Decoder inputs that grow step by step: attention mask, next positions and the cache."""

    mask: np.ndarray                 # [B, slots] int32
    next_pos: np.ndarray             # [B] int32: position of the next token of each row
    past: list[np.ndarray] = field(default_factory=list)   # 2 * layers arrays [B, kv, slots, hd]


def prefill_inputs(embeds: list[np.ndarray], *, num_layers: int, num_kv_heads: int, head_dim: int,
                   dtype: np.dtype, prefill_slots: int = 1) -> tuple[np.ndarray, np.ndarray, KvState]:
    """Left-pad per-row prompt embeddings ``[n_i, hidden]`` → (inputs_embeds, position_ids, state)."""
    b = len(embeds)
    length = max(e.shape[0] for e in embeds)
    hidden = embeds[0].shape[1]
    x = np.zeros((b, length, hidden), dtype=dtype)
    pos = np.zeros((b, length), dtype=np.int32)
    mask = np.zeros((b, prefill_slots + length), dtype=np.int32)
    for i, e in enumerate(embeds):
        n = e.shape[0]
        x[i, length - n:] = e
        pos[i, length - n:] = np.arange(n, dtype=np.int32)
        mask[i, prefill_slots + length - n:] = 1
    past = [np.zeros((b, num_kv_heads, prefill_slots, head_dim), dtype=dtype) for _ in range(2 * num_layers)]
    state = KvState(mask=mask, next_pos=np.asarray([e.shape[0] for e in embeds], dtype=np.int32), past=past)
    return x, pos, state


def greedy_generate(run_decoder: Callable, embed_ids: Callable, first: tuple, *, max_new_tokens: int,
                    stop_ids: set[int], suppress_ids: list[int], is_stopped: Callable[[int, list[int]], bool],
                    on_step: Optional[Callable[[list[list[int]]], None]] = None) -> list[list[int]]:
    """Greedy decode; returns the generated ids of each row (stop ids excluded).

    ``run_decoder(inputs_embeds, mask, positions, past) -> (logits [B,S,V], presents)``;
    ``embed_ids(ids [B,1]) -> [B,1,hidden]``; ``first`` is ``(inputs_embeds, positions, KvState)``
    from :func:`prefill_inputs`. A row stops at a stop id or when ``is_stopped(row, ids)`` (a stop
    string appeared); finished rows keep being fed (their output is ignored) until all stop.
    """
    x, pos, state = first
    b = x.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for _ in range(max_new_tokens):
        logits, state.past = run_decoder(x, state.mask, pos, state.past)
        last = logits[:, -1, :].astype(np.float32, copy=True)
        if suppress_ids:
            last[:, suppress_ids] = -np.inf
        nxt = last.argmax(axis=-1).astype(np.int64)
        for i in range(b):
            if done[i]:
                continue
            t = int(nxt[i])
            if t in stop_ids:
                done[i] = True
                continue
            out[i].append(t)
            if is_stopped(i, out[i]):
                done[i] = True
        if on_step is not None:
            on_step(out)
        if all(done):
            break
        x = embed_ids(nxt.astype(np.int32)[:, None])
        pos = state.next_pos[:, None].copy()
        state.next_pos = state.next_pos + 1
        state.mask = np.concatenate([state.mask, np.ones((b, 1), dtype=np.int32)], axis=1)
    return out
