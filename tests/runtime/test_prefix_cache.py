"""Follow-up questions (issue 31): the image's prompt-prefix KV cache is reused, the follow-up prefills only
its own tokens, and every answer is the cold run's, token for token (medlite/runtime/prefix_cache.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export_tiny_model import random_image
from medlite.prompting import encode_prompt, expand_image_tokens
from medlite.runtime import OnnxVlm
from medlite.runtime.prefix_cache import PrefixCache, image_key

QUESTIONS = ["is there a lesion in the lung ?", "which organ is this ?", "what modality shows this ?",
             "is there a fracture ?"]


def expected_prefix(vlm, question: str) -> list:
    """The prompt's ids up to where the question text starts, tokenized here from the rendered text."""
    c = vlm.config
    text = c.template.render(question)
    head = text[: text.index(question)]
    ids = encode_prompt(vlm.tokenizer, head, image_token_id=c.image_token_id, bos_token_id=c.bos_token_id)
    return expand_image_tokens(ids, c.image_token_id, c.num_image_tokens)


def recording(vlm) -> list:
    """Replace ``vlm._decoder`` by one that records (tokens fed, past slots) of every call."""
    calls, run = [], vlm._decoder

    def rec(x, mask, pos, past):
        calls.append((int(x.shape[1]), int(past[0].shape[2]), np.asarray(pos).ravel().tolist()))
        return run(x, mask, pos, past)

    vlm._decoder = rec
    return calls


@pytest.fixture(scope="module")
def rt_export_fused(rt_model, rt_ctx, tmp_path_factory):
    """The fused ONNX Runtime decoder (GroupQueryAttention on the BNSH cache; medlite/export/fused_decoder.py)."""
    from medlite.export import export_onnx

    out = tmp_path_factory.mktemp("rt_fused")
    export_onnx(rt_model, out, ctx=rt_ctx, decoder_graph="fused")
    decoder = json.loads((out / "medlite_runtime.json").read_text())["graphs"]["decoder"]
    assert "GroupQueryAttention" in decoder["fused"]["ops"]
    return out


@pytest.fixture(params=["fp32", "fp16", "fused"])
def export(request):
    return request.getfixturevalue({"fp32": "rt_export", "fp16": "rt_export_fp16",
                                    "fused": "rt_export_fused"}[request.param])


def test_followups_equal_cold_runs_and_prefill_only_the_question(export):
    cold_vlm = OnnxVlm.open(export, providers=["CPUExecutionProvider"])
    vlm = OnnxVlm.open(export, providers=["CPUExecutionProvider"])
    vlm.prefix_cache = PrefixCache()
    calls = recording(vlm)
    for seed in (0, 1):
        image = random_image(seed)
        for i, q in enumerate(QUESTIONS):
            cold = cold_vlm.generate_ids([image], [q], max_new_tokens=10)[0]
            del calls[:]
            warm, info = vlm.prefix_cache.generate(vlm, image, q, max_new_tokens=10)
            assert warm == cold, (seed, q)
            full, head = vlm.prompt_ids(q), expected_prefix(vlm, q)
            assert full[: len(head)] == head and len(head) > vlm.config.num_image_tokens
            n_new = len(full) if i == 0 else len(full) - len(head)
            # the first decoder call is the prefill: exactly the new tokens, after the kept prefix
            fed, past_slots, positions = calls[0]
            assert (fed, info["prefill_tokens"]) == (n_new, n_new), (seed, q)
            if i == 0:
                assert (info["cache"], past_slots) == ("miss", 1)
            else:
                assert info == {"prefill_tokens": n_new, "cached_tokens": len(head), "cache": "hit"}
                assert past_slots == 1 + len(head) and positions == list(range(len(head), len(full)))
    s = vlm.prefix_cache.stats()
    assert (s["hits"], s["misses"], s["entries"], s["evicted_new_image"]) == (6, 2, 1, 1)


def test_followup_first_token_logits_match_a_whole_prefill(rt_export):
    """The decoder math: prefix, then the rest with past = the prefix's cache, gives the one-chunk logits."""
    vlm = OnnxVlm.open(rt_export, providers=["CPUExecutionProvider"])
    image = random_image(5)
    cache = PrefixCache()
    cache.generate(vlm, image, QUESTIONS[0], max_new_tokens=1)
    first, run, info = cache.first_inputs(vlm, image, QUESTIONS[2])
    assert info["cache"] == "hit"
    x, pos, state = first
    logits, _ = run(x, state.mask, pos, state.past)
    whole = vlm.first_token_logits(image, QUESTIONS[2])
    np.testing.assert_allclose(logits[0, -1], whole, rtol=1e-4, atol=1e-5)
    assert int(np.argmax(logits[0, -1])) == int(np.argmax(whole))


def test_answer_with_a_cache_streams_the_same_answer(rt_export):
    vlm = OnnxVlm.open(rt_export, providers=["CPUExecutionProvider"])
    image = random_image(7)
    plain = [vlm.answer(image, q, max_new_tokens=8) for q in QUESTIONS[:2]]
    assert vlm.last_prefill["cache"] == "off"
    vlm.prefix_cache = PrefixCache()
    pieces: list = []
    got = [vlm.answer(image, q, max_new_tokens=8, on_token=pieces.append) for q in QUESTIONS[:2]]
    assert got == plain and "".join(pieces) == "".join(plain)
    assert vlm.last_prefill["cache"] == "hit"


def _past(nbytes_each: int, n: int = 4) -> list:
    return [np.zeros(nbytes_each // 4 // n, dtype=np.float32) for _ in range(n)]


def test_cache_bound_lru_new_image_and_too_big():
    cache = PrefixCache(max_bytes=2500)
    for scope in range(6):                     # six sessions, 1000 bytes each: at most two kept
        assert cache.store(scope, f"img{scope}", [1, 2], _past(1000))
        assert cache.nbytes <= 2500 and len(cache) <= 2
    assert cache.lookup(0, "img0", [1, 2]) is None          # the oldest went first
    assert cache.lookup(5, "img5", [1, 2]) is not None
    assert cache.store(4, "img4", [1, 2, 3], _past(1000))    # LRU: session 4 (not 5, just used) is dropped
    assert cache.lookup(5, "img5", [1, 2]) is not None
    assert cache.lookup(5, "other", [1, 2]) is None           # session 5 moved to another image: old one gone
    assert cache.lookup(5, "img5", [1, 2]) is None
    assert not cache.store(7, "big", [1], _past(4000))        # larger than the bound: not kept
    s = cache.stats()
    assert s["evicted_new_image"] == 1 and s["too_big"] == 1 and s["evicted_lru"] == 5
    assert s["bytes"] == cache.nbytes <= 2500
    assert cache.drop_scope(4) == 1 and len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=-1)


def test_image_key_is_the_pixels_content():
    a = np.zeros((1, 3, 4, 4), dtype=np.float32)
    b = a.copy()
    assert image_key(a) == image_key(b)
    b[0, 0, 0, 0] = 1e-7
    assert image_key(a) != image_key(b)
    assert image_key(a) != image_key(a.astype(np.float16))


# -- the demo model: `medlite ask` with two questions on one image --------------------------------
@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.export import export_onnx

    ctx = RunContext(quiet=True)
    out = tmp_path_factory.mktemp("pc-demo-export")
    export_onnx(load_model(ensure_demo_model(ctx), ctx=ctx), out, ctx=ctx, precision="fp32")
    return out


def test_ask_two_questions_on_the_demo_model(demo_export, tmp_path, capsys):
    from medlite.cli import main
    from medlite.evaluation.vqa import load_dataset

    samples = [s for s in load_dataset("builtin:micro-med-vqa", split="test")][:40]
    sample = samples[0]
    q1, q2 = sample.question, next(s.question for s in samples if s.image_id == sample.image_id
                                   and s.question != sample.question)
    path = tmp_path / "scan.png"
    sample.load_image().save(path)
    assert main(["ask", "--model", str(demo_export), "--image", str(path), "--question", q1, "--question", q2,
                 "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["answers"]
    cold = OnnxVlm.open(demo_export, providers=["CPUExecutionProvider"])
    from PIL import Image

    image = Image.open(path).convert("RGB")
    assert [a["answer"] for a in out] == [cold.answer(image, q, max_new_tokens=12) for q in (q1, q2)]
    head = expected_prefix(cold, q2)
    assert [a["prefill_tokens"] for a in out] == [len(cold.prompt_ids(q1)), len(cold.prompt_ids(q2)) - len(head)]
    assert [a["cached_tokens"] for a in out] == [0, len(head)]
    # the text output names each question's prefill
    assert main(["ask", str(demo_export), "--image", str(path), q1, q2, "--max-new-tokens", "12"]) == 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"prefill {len(cold.prompt_ids(q1))}, {len(cold.prompt_ids(q2)) - len(head)} tokens")
