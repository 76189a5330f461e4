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


def test_an_onnxruntime_that_rejects_the_fused_ops_says_what_to_do(tmp_path):
    """onnxruntime 1.19.2 refuses the fused decoder's 17-input GroupQueryAttention (measured); the same kind of
    load failure (here: one input too many for 1.32) is one line naming the file and the two ways out."""
    from onnx import TensorProto, helper

    from medlite.errors import DataError
    from medlite.runtime.sessions import open_session

    names = [f"i{k}" for k in range(18)]
    node = helper.make_node("GroupQueryAttention", names, ["o"], domain="com.microsoft", num_heads=1, kv_num_heads=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    (tmp_path / "decoder.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(DataError) as ei:
        open_session(tmp_path / "decoder.onnx", ["CPUExecutionProvider"])
    msg = str(ei.value)
    assert msg.startswith(f"{tmp_path / 'decoder.onnx'}: ONNX Runtime could not load the graph")
    assert "fused ONNX Runtime decoder" in msg and "export.decoder_graph=plain" in msg
