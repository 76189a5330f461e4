"""OnnxVlm against transformers: answers, first-token logits, image embeddings, batching, streaming."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from export_tiny_model import hf_greedy, hf_inputs, random_image
from medlite.prompting import clean_answer
from medlite.runtime import OnnxVlm

QUESTIONS = ["is there a lesion in the lung ?", "which organ is this ?", "what modality shows this ?",
             "is this normal ?"]


@pytest.fixture(scope="module")
def vlm(rt_export, rt_ctx):
    return OnnxVlm.open(rt_export, ctx=rt_ctx)


def test_greedy_ids_equal_transformers(rt_model, vlm):
    images = [random_image(i) for i in range(len(QUESTIONS))]
    got = [vlm.generate_ids([im], [q], max_new_tokens=10)[0] for im, q in zip(images, QUESTIONS)]
    ref = [hf_greedy(rt_model, im, q, max_new_tokens=10) for im, q in zip(images, QUESTIONS)]
    assert got == ref
    assert max(len(r) for r in ref) >= 3          # the comparison covers real multi-token answers
    for im, q, ids in zip(images, QUESTIONS, ref):
        assert vlm.answer(im, q, max_new_tokens=10) == clean_answer(
            rt_model.tokenizer.decode(ids, skip_special_tokens=True), ("</s>",))


def test_answers_equal_the_pytorch_reference(rt_model, vlm):
    """medlite.checkpoints.generate (KV-cache greedy in PyTorch) is the reference every stage meets."""
    from medlite.checkpoints import generate

    images = [random_image(30 + i) for i in range(len(QUESTIONS))]
    for im, q in zip(images, QUESTIONS):
        assert vlm.answer(im, q, max_new_tokens=12) == generate.answer(rt_model, im, q, max_new_tokens=12)
        ref = generate.first_token_logits(rt_model, im, q)
        assert np.abs(vlm.first_token_logits(im, q) - ref).max() <= 1e-4
    assert vlm.answer_batch(images, QUESTIONS, max_new_tokens=12) == generate.answer_batch(
        rt_model, images, QUESTIONS, max_new_tokens=12)
    assert np.abs(vlm.image_embeddings(images[0]) - generate.image_embeddings(rt_model, images[0])).max() <= 1e-4


def test_batch_equals_one_by_one(vlm):
    images = [random_image(10 + i, size=(28 + 9 * i, 33)) for i in range(3)]
    questions = QUESTIONS[:3]
    batch = vlm.generate_ids(images, questions, max_new_tokens=8)
    single = [vlm.generate_ids([im], [q], max_new_tokens=8)[0] for im, q in zip(images, questions)]
    assert batch == single


@torch.no_grad()
def test_first_token_logits_and_image_embeddings(rt_model, vlm):
    img = random_image(3)
    ids, pv = hf_inputs(rt_model, img, QUESTIONS[0])
    ref = rt_model.model(input_ids=ids, pixel_values=pv).logits[0, -1].numpy()
    got = vlm.first_token_logits(img, QUESTIONS[0])
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4
    cfg = rt_model.model.config
    feats = rt_model.model.model.get_image_features(pv, vision_feature_layer=cfg.vision_feature_layer,
                                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    emb = vlm.image_embeddings(img)
    assert emb.shape == (rt_model.num_image_tokens, rt_model.model.config.text_config.hidden_size)
    assert np.abs(emb - feats.pooler_output[0].numpy()).max() <= 1e-4


def test_raw_table_embedding_equals_embed_graph(rt_export, vlm):
    table_vlm = OnnxVlm.open(rt_export, embed_source="table")
    assert "embed" not in table_vlm.sessions
    img = random_image(4)
    np.testing.assert_array_equal(table_vlm.first_token_logits(img, QUESTIONS[1]),
                                  vlm.first_token_logits(img, QUESTIONS[1]))


def test_streamed_pieces_make_the_answer(vlm):
    """Pieces always join to the final answer (byte-fallback runs and stop prefixes are held back)."""
    counts = []
    for i, q in enumerate(QUESTIONS):
        pieces: list[str] = []
        ans = vlm.answer(random_image(i), q, max_new_tokens=12, on_token=pieces.append)
        assert "".join(pieces) == ans
        counts.append(len(pieces))
    assert max(counts) >= 2                       # streaming really streamed somewhere


def test_template_stop_string_cuts_generation(rt_export, vlm):
    img = random_image(0)
    ids = vlm.generate_ids([img], [QUESTIONS[0]], max_new_tokens=10)[0]
    tok = vlm.tokenizer
    for k in range(1, len(ids)):   # a later token whose text first appears at step k
        stop_word = tok.decode([ids[k]]).strip()
        if stop_word and stop_word not in tok.decode(ids[:k]) and stop_word in tok.decode(ids[:k + 1]):
            break
    else:
        pytest.fail(f"no usable stop word in {ids}")
    other = OnnxVlm.open(rt_export)
    other.config.template = dataclasses.replace(other.config.template, stop=("</s>", stop_word))
    cut = other.generate_ids([img], [QUESTIONS[0]], max_new_tokens=10)[0]
    assert cut == ids[:k + 1]                     # generation stopped when the stop string appeared
    assert stop_word not in other.answer(img, QUESTIONS[0], max_new_tokens=10)


def test_unavailable_provider_is_reported(rt_export):
    """Asking for CUDA on a CPU-only onnxruntime: the fallback is reported, not silent."""
    vlm = OnnxVlm.open(rt_export, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert all(p == ["CPUExecutionProvider"] for p in vlm.providers.values())
    assert len(vlm.warnings) == 3 and all("CUDAExecutionProvider" in w and "NOT in use" in w for w in vlm.warnings)


def test_fp16_runtime_agrees_with_fp32(rt_export_fp16, vlm):
    half = OnnxVlm.open(rt_export_fp16)
    agree = 0
    for i, q in enumerate(QUESTIONS):
        img = random_image(20 + i)
        a, b = vlm.first_token_logits(img, q), half.first_token_logits(img, q)
        assert np.isfinite(b).all()
        assert np.abs(a - b).max() <= 3e-2 * np.abs(a).max()
        agree += int(a.argmax() == b.argmax())
    assert agree >= 3
    assert half.image_embeddings(random_image(1)).dtype == np.float32
