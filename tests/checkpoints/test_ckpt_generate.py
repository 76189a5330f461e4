"""Reference generation: greedy with KV cache equals a no-cache recomputation; batching; stops; suppression."""
from __future__ import annotations

import pytest
import torch

from medlite.checkpoints import load_model
from medlite.checkpoints.generate import answer, answer_batch, pixel_values, prompt_ids


@pytest.fixture(scope="module")
def phi(random_ckpt, ctx):
    return load_model(random_ckpt("tiny-phi", "legacy"), ctx=ctx)


@pytest.fixture(scope="module")
def llama(random_ckpt, ctx):
    return load_model(random_ckpt("tiny", "legacy"), ctx=ctx)


def _greedy_without_cache(loaded, image, question, n):
    """The test's own decoding: full forward each step, argmax over the source vocabulary."""
    ids = prompt_ids(loaded, question)
    px = pixel_values(loaded, image)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids]), pixel_values=px).logits[0, -1]
        t = int(logits[: loaded.image_token_id].argmax())
        if t in loaded.eos_token_ids:
            break
        out.append(t)
        ids.append(t)
    return out


def test_prompt_expands_the_image_token(llama):
    ids = prompt_ids(llama, "What is shown?")
    assert ids.count(llama.image_token_id) == llama.num_image_tokens == 16
    assert ids[0] == llama.bos_token_id == 1
    first = ids.index(llama.image_token_id)
    assert ids[first:first + 16] == [llama.image_token_id] * 16


def test_kv_cache_greedy_equals_recomputation(llama, photo):
    want = _greedy_without_cache(llama, photo, "Describe the image.", 8)
    got = answer(llama, photo, "Describe the image.", max_new_tokens=8)
    assert got == llama.tokenizer.decode(want, skip_special_tokens=True).strip()
    assert len(want) == 8  # random weights: no early eos here, so 8 real steps were compared


def test_streaming_pieces_add_up(llama, photo):
    pieces: list[str] = []
    full = answer(llama, photo, "Describe the image.", max_new_tokens=8, on_text=pieces.append)
    assert "".join(pieces).strip() == full and len(pieces) > 1


def test_batch_equals_single(llama, photo):
    qs = ["Is there a fracture?", "Which organ is shown in this slide, and is it normal tissue?"]
    imgs = [photo, photo.transpose(0)]
    batch = answer_batch(llama, imgs, qs, max_new_tokens=6)
    assert batch == [answer(llama, im, q, max_new_tokens=6) for im, q in zip(imgs, qs)]


def test_image_token_is_never_generated(phi, photo):
    base = answer(phi, photo, "What is it?", max_new_tokens=5)
    bias = phi.model.lm_head.bias
    old = float(bias.detach()[phi.image_token_id])
    with torch.no_grad():
        bias[phi.image_token_id] = 1e4  # would win every argmax without suppression
    try:
        assert answer(phi, photo, "What is it?", max_new_tokens=5) == base
    finally:
        with torch.no_grad():
            bias[phi.image_token_id] = old


def test_stops_at_eos(phi, photo):
    bias = phi.model.lm_head.bias
    eos = phi.eos_token_ids[0]
    old = float(bias.detach()[eos])
    with torch.no_grad():
        bias[eos] = 1e4
    try:
        assert answer(phi, photo, "What is it?", max_new_tokens=5) == ""
        assert answer_batch(phi, [photo], ["What is it?"], max_new_tokens=5) == [""]
    finally:
        with torch.no_grad():
            bias[eos] = old
