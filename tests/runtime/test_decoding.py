"""The numpy decoding loop on its own: padding layout, suppression, stop ids, cache growth."""
from __future__ import annotations

import numpy as np

from medlite.runtime.decoding import greedy_generate, prefill_inputs


def test_prefill_layout_left_pads_after_the_dummy_slot():
    rows = [np.ones((3, 4), np.float32), 2 * np.ones((1, 4), np.float32)]
    x, pos, st = prefill_inputs(rows, num_layers=2, num_kv_heads=1, head_dim=2, dtype=np.float16)
    assert x.shape == (2, 3, 4) and x.dtype == np.float16
    np.testing.assert_array_equal(st.mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(pos, [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(x[1, :2], 0)
    assert list(st.next_pos) == [3, 1]
    assert len(st.past) == 4 and st.past[0].shape == (2, 1, 1, 2) and not st.past[0].any()


def test_suppressed_id_never_wins_and_cache_grows():
    vocab, seen = 6, []

    def run_decoder(x, mask, pos, past):
        seen.append((x.shape, mask.copy(), pos.copy(), past[0].shape))
        logits = np.zeros((x.shape[0], x.shape[1], vocab), np.float32)
        logits[..., 5] = 100.0                     # the suppressed id is always the largest
        logits[..., 1 + len(seen) % 3] = 10.0      # then 2, 3, 1, 2, ...
        grown = [np.concatenate([p, np.zeros((p.shape[0], 1, x.shape[1], 1), p.dtype)], axis=2) for p in past]
        return logits, grown

    rows = [np.zeros((2, 3), np.float32)]
    first = prefill_inputs(rows, num_layers=1, num_kv_heads=1, head_dim=1, dtype=np.float32)
    out = greedy_generate(run_decoder, lambda ids: np.zeros((ids.shape[0], 1, 3), np.float32), first,
                          max_new_tokens=4, stop_ids={0}, suppress_ids=[5], is_stopped=lambda r, ids: False)
    assert out == [[2, 3, 1, 2]]
    assert [s[3][2] for s in seen] == [1, 3, 4, 5]           # past slots: dummy, +2 prompt, +1 per step
    np.testing.assert_array_equal(seen[1][1], [[0, 1, 1, 1]])
    np.testing.assert_array_equal(seen[2][2], [[3]])          # positions continue after the prompt


def test_stop_id_ends_only_that_row():
    def run_decoder(x, mask, pos, past):
        logits = np.zeros((2, x.shape[1], 4), np.float32)
        logits[0, :, 0] = 1.0                      # row 0: the stop id at once
        logits[1, :, 3] = 1.0                      # row 1: token 3 forever
        return logits, past

    first = prefill_inputs([np.zeros((1, 2), np.float32)] * 2, num_layers=1, num_kv_heads=1, head_dim=1,
                           dtype=np.float32)
    out = greedy_generate(run_decoder, lambda ids: np.zeros((2, 1, 2), np.float32), first, max_new_tokens=3,
                          stop_ids={0}, suppress_ids=[], is_stopped=lambda r, ids: False)
    assert out == [[], [3, 3, 3]]
