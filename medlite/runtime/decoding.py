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


class BoundDecoder:
    """``run_decoder`` for :func:`greedy_generate` with the KV cache bound through ONNX Runtime IO binding.

    ``session.run`` returns every ``present`` as a new array and takes every ``past`` as a feed,
    so each decode step allocates and copies the whole cache once more. Here the cache lives in two
    sets of pre-allocated flat buffers (ping-pong): step *t* reads ``past`` from one set and ONNX
    Runtime writes ``present`` straight into the other (bound by pointer), and the returned presents
    are views on those buffers — fed back at step *t + 1* without a copy. Buffers are sized for
    ``GROW_SLOTS`` more tokens than asked and grow (doubling) only past that. A returned present
    stays valid until the call after next.
    Numbers are identical to ``session.run`` (same graph, same kernels; tested in tests/runtime).
    """

    GROW_SLOTS = 256

    def __init__(self, session, past_names: list, present_names: list, *, embed_dtype, kv_dtype):
        self.session = session
        self.past_names, self.present_names = list(past_names), list(present_names)
        self.embed_dtype, self.kv_dtype = np.dtype(embed_dtype), np.dtype(kv_dtype)
        self._sets: list[list[np.ndarray]] = [[], []]

    def _target_set(self, past: list) -> int:
        """The buffer set that does not hold ``past`` (so ORT never reads and writes one buffer)."""
        for i, bufs in enumerate(self._sets):
            if bufs and past and np.shares_memory(bufs[0], past[0]):
                return 1 - i
        return 0

    def _buffers(self, which: int, count: int, per_slot: int) -> list[np.ndarray]:
        bufs = self._sets[which]
        if not bufs or bufs[0].size < count:
            # Room for GROW_SLOTS more tokens at once, so a typical answer never reallocates.
            size = max(count + self.GROW_SLOTS * per_slot, 2 * (bufs[0].size if bufs else 0))
            bufs = [np.empty(size, dtype=self.kv_dtype) for _ in self.present_names]
            self._sets[which] = bufs
        return bufs

    def _bind_input(self, io, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def __call__(self, x, mask, pos, past):
        io = self.session.io_binding()
        x = np.ascontiguousarray(x, dtype=self.embed_dtype)
        keep = [x, np.ascontiguousarray(mask, dtype=np.int32), np.ascontiguousarray(pos, dtype=np.int32)]
        for name, arr in zip(("inputs_embeds", "attention_mask", "position_ids"), keep):
            self._bind_input(io, name, arr)
        past = [np.ascontiguousarray(p, dtype=self.kv_dtype) for p in past]
        for name, arr in zip(self.past_names, past):
            self._bind_input(io, name, arr)
        b, kvh, slots, hd = past[0].shape
        shape = (b, kvh, slots + x.shape[1], hd)
        bufs = self._buffers(self._target_set(past), int(np.prod(shape)), b * kvh * hd)
        presents = [buf[: int(np.prod(shape))].reshape(shape) for buf in bufs]
        io.bind_output("logits", "cpu")
        for name, arr in zip(self.present_names, presents):
            io.bind_output(name, "cpu", 0, arr.dtype, list(shape), arr.ctypes.data)
        self.session.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        del keep, past   # the bound inputs had to stay alive until the run finished
        return logits, presents
