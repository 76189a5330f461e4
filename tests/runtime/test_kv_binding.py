"""The IO-bound KV cache (BoundDecoder) against plain ``session.run`` (the independent reference)."""
from __future__ import annotations

import numpy as np

from medlite.runtime.decoding import BoundDecoder


def _pairs(n=3):
    from medlite.evaluation.vqa import load_dataset

    samples = load_dataset("builtin:micro-med-vqa", split="test")[:n]
    return [s.load_image() for s in samples], [s.question for s in samples]


def test_bound_cache_gives_identical_tokens_and_logits(rt_export):
    from medlite.runtime.vlm import OnnxVlm

    vlm = OnnxVlm.open(rt_export, providers=["CPUExecutionProvider"])
    assert isinstance(vlm._bound, BoundDecoder)
    images, questions = _pairs()
    bound_ids = vlm.generate_ids(images, questions, max_new_tokens=12)
    bound_logits = vlm.first_token_logits(images[0], questions[0])
    vlm._bound = None                                    # plain session.run path
    np.testing.assert_array_equal(vlm.first_token_logits(images[0], questions[0]), bound_logits)
    assert vlm.generate_ids(images, questions, max_new_tokens=12) == bound_ids


def test_presents_live_in_two_preallocated_buffer_sets(rt_export):
    from medlite.runtime.vlm import OnnxVlm

    vlm = OnnxVlm.open(rt_export, providers=["CPUExecutionProvider"])
    images, questions = _pairs(2)
    x, pos, state = vlm._first(images, questions)
    dec = vlm._bound
    logits, past = dec(x, state.mask, pos, state.past)
    first_set = [b for b in dec._sets[0]]
    assert all(np.shares_memory(p, b) for p, b in zip(past, first_set))
    seen = []
    mask = state.mask
    for step in range(4):       # decode steps alternate between the two sets, never reallocating
        mask = np.concatenate([mask, np.ones((2, 1), np.int32)], axis=1)
        emb = vlm._embed(np.argmax(logits[:, -1], -1).astype(np.int32)[:, None])
        logits, past = dec(emb, mask, state.next_pos[:, None] + step, past)
        seen.append(next(i for i, s in enumerate(dec._sets) if np.shares_memory(past[0], s[0])))
    assert seen == [1, 0, 1, 0]
    assert all(a is b for a, b in zip(dec._sets[0], first_set))
    assert past[0].shape[2] == state.mask.shape[1] + 4
