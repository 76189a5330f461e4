"""``OnnxVlm`` runs the fused ONNX Runtime decoder unchanged (same interface as the traced graph): the same
greedy answers as the plain export — one by one with streaming, and in a left-padded batch through the
IO-bound KV buffers — and close first-token logits, for fp32 and fp16 (xavier-nx-int4 ships an fp16 one)."""
from __future__ import annotations

import numpy as np
import pytest

QUESTIONS = ["is there a lesion in the image ?", "which organ is this ?", "what modality shows this ?"]


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("precision,rel", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_fused_export_answers_like_the_plain_one(rt_model, rt_ctx, tmp_path, image, precision, rel):
    from medlite.export import export_onnx
    from medlite.runtime import OnnxVlm
    from medlite.runtime.config import RuntimeConfig

    got = {}
    for graph in ("plain", "fused"):
        export_onnx(rt_model, tmp_path / graph, ctx=rt_ctx, precision=precision, decoder_graph=graph)
        assert bool(RuntimeConfig.load(tmp_path / graph).graphs["decoder"].fused) == (graph == "fused")
        vlm = OnnxVlm.open(tmp_path / graph, providers=["CPUExecutionProvider"])
        assert vlm._bound is not None                       # the CPU path binds the KV cache
        pieces: list[str] = []
        single = vlm.answer(image, QUESTIONS[0], max_new_tokens=10, on_token=pieces.append)
        assert "".join(pieces) == single
        batch = vlm.answer_batch([image] * 3, QUESTIONS, max_new_tokens=10)
        logits = np.stack([vlm.first_token_logits(image, q) for q in QUESTIONS])
        got[graph] = (single, batch, logits)
    assert got["fused"][:2] == got["plain"][:2]
    ref = got["plain"][2]
    assert np.abs(got["fused"][2] - ref).max() <= rel * np.abs(ref).max()
