"""The fused ONNX Runtime decoder (medlite/export/fused_decoder.py) against the traced one, on the random
tiny model: same interface, same logits and cache (real rows and slots) at prefill and decode shapes with
left padding and the dummy slot; the export records which graph it wrote; unsupported models fall back
(auto) or fail with one line (fused)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from medlite.errors import ExportError


@pytest.fixture(scope="module")
def both(tiny, ctx, tmp_path_factory):
    """(plain folder, fused folder, fused ExportResult) of the fp32 export."""
    from medlite.export import export_onnx

    plain, fused = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("fused")
    export_onnx(tiny, plain, ctx=ctx, components=["decoder"])
    res = export_onnx(tiny, fused, ctx=ctx, components=["decoder"], decoder_graph="fused")
    return plain, fused, res


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC   # as the runtime runs INT4 graphs
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess, b: int, s: int, past: int, pad: list, seed: int = 0) -> dict:
    """Random embeddings and cache; slot 0 is the dummy slot, ``pad[i]`` more slots of row i are blocked."""
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in sess.get_inputs():
        if vi.name.startswith("past_key_values"):
            kv, hd = vi.shape[1], vi.shape[3]
            feed[vi.name] = rng.standard_normal((b, kv, past, hd)).astype(np.float32)
        elif vi.name == "inputs_embeds":
            feed[vi.name] = rng.standard_normal((b, s, vi.shape[2])).astype(np.float32)
    mask = np.ones((b, past + s), np.int32)
    for i, p in enumerate(pad):
        mask[i, : 1 + p] = 0
    feed["attention_mask"] = mask
    feed["position_ids"] = np.tile(np.arange(past - 1, past - 1 + s, dtype=np.int32), (b, 1))
    return feed


@pytest.mark.parametrize("b,s,past,pad", [(1, 6, 1, [0]), (2, 5, 1, [0, 3]), (1, 1, 9, [0]), (3, 1, 12, [0, 4, 2]),
                                          (2, 3, 7, [2, 0])])
def test_fused_equals_traced_on_real_rows_and_slots(both, b, s, past, pad):
    plain, fused, _ = both
    sp, sf = _session(plain / "decoder.onnx"), _session(fused / "decoder.onnx")
    feed = _feeds(sp, b, s, past, pad)
    want, got = sp.run(None, feed), sf.run(None, feed)
    names = [o.name for o in sp.get_outputs()]
    assert names == [o.name for o in sf.get_outputs()]
    mask = feed["attention_mask"].astype(bool)
    rows = mask[:, -s:]                       # query rows that are real tokens (padding queries are ignored)
    assert np.isfinite(got[0]).all()
    ref = want[0][rows]
    assert np.abs(got[0][rows] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    for w, g_, name in zip(want[1:], got[1:], names[1:]):
        assert w.shape == g_.shape, name
        real = np.broadcast_to(mask[:, None, :, None], w.shape)   # slots a real query may read
        assert np.abs(w - g_)[real].max() <= 1e-5, name


def test_fused_graph_has_no_decomposed_attention(both):
    plain, fused, res = both
    ops_f = res.ops["decoder"]
    assert ops_f.get("com.microsoft.GroupQueryAttention") == 2 and ops_f.get("com.microsoft.RotaryEmbedding") == 4
    assert ops_f.get("com.microsoft.SkipSimplifiedLayerNormalization") == 4
    # no repeat_kv Expand, K^T Transpose, eager Softmax or past/present Concat per layer: what is left
    # is the once-per-call arithmetic for GQA's inputs (seqlens_k, query_seqlens, the bias shape)
    for op, most in (("Expand", 3), ("Transpose", 0), ("Softmax", 0), ("Concat", 1)):
        assert ops_f.get(op, 0) <= most, (op, ops_f)
    n_plain = len(onnx.load(str(plain / "decoder.onnx")).graph.node)
    assert sum(ops_f.values()) < n_plain / 3, (sum(ops_f.values()), n_plain)
    assert res.decoder_graph["graph"] == "fused"
    from medlite.runtime.config import RuntimeConfig

    assert RuntimeConfig.load(fused).graphs["decoder"].fused["graph"] == "fused"
    assert RuntimeConfig.load(fused).graphs["decoder"].runtime == "onnxruntime"
    assert "fused" not in (plain / "medlite_runtime.json").read_text()    # plain exports' config unchanged
    assert RuntimeConfig.load(fused).graphs["decoder"].inputs == RuntimeConfig.load(plain).graphs["decoder"].inputs


def test_fused_export_is_deterministic(tiny, ctx, both, tmp_path):
    from medlite.export import export_onnx

    _, fused, _ = both
    export_onnx(tiny, tmp_path, ctx=ctx, components=["decoder"], decoder_graph="fused")
    assert (tmp_path / "decoder.onnx").read_bytes() == (fused / "decoder.onnx").read_bytes()


def test_unsupported_backbone_falls_back_or_fails(ctx, tmp_path):
    from export_tiny_model import checkpoint_model

    from medlite.export import export_onnx

    phi = checkpoint_model("tiny-phi", "legacy", tmp_path / "ckpt", ctx)
    with pytest.raises(ExportError, match="decoder_graph fused cannot be written.*phi"):
        export_onnx(phi, tmp_path / "f", ctx=ctx, components=["decoder"], decoder_graph="fused")
    res = export_onnx(phi, tmp_path / "a", ctx=ctx, components=["decoder"], decoder_graph="auto")
    assert res.decoder_graph["graph"] == "plain" and "phi" in res.decoder_graph["reason"]
    assert "GroupQueryAttention" not in str(res.ops["decoder"])
    with pytest.raises(ExportError, match="decoder_graph 'fast'"):
        export_onnx(phi, tmp_path / "x", ctx=ctx, components=["decoder"], decoder_graph="fast")


def _run_export_stage(tiny, ctx, work, target: str, **options):
    from types import SimpleNamespace

    from medlite.engines.targets import get_target
    from medlite.export.plan import ExportPlan
    from medlite.pipeline.stages.export import run
    from medlite.recipes.options import ExportOptions

    state = SimpleNamespace(ctx=ctx, target=get_target(target), model=tiny, work=work, export_plan=ExportPlan())
    return run(state, 0, ExportOptions(**options))


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_recipes_export_the_traced_graphs_byte_for_byte(tiny, ctx, tmp_path, precision):
    """A TensorRT target's export stage (decoder_graph left at auto) writes exactly what the plain export
    path writes — every graph and the runtime config — and its manifest has no decoder_graph entry."""
    from medlite.export import export_onnx

    result = _run_export_stage(tiny, ctx, tmp_path / "stage", "jetson-xavier-agx-32gb", precision=precision)
    export_onnx(tiny, tmp_path / "plain", ctx=ctx, precision=precision, opset=17)
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "stage").iterdir())
    for name in names:
        assert (tmp_path / "stage" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    assert "decoder_graph" not in result.manifest


def test_cpu_target_export_stage_writes_the_fused_decoder(tiny, ctx, tmp_path):
    result = _run_export_stage(tiny, ctx, tmp_path, "cpu-x86_64", precision="fp32")
    assert result.manifest["decoder_graph"]["graph"] == "fused"
    assert "com.microsoft.GroupQueryAttention" in result.manifest["ops"]["decoder"]
    assert "decoder" in result.manifest["onnxruntime_only"]      # contrib ops: never the TensorRT check
    plain = _run_export_stage(tiny, ctx, tmp_path / "p", "cpu-x86_64", precision="fp32", decoder_graph="plain")
    assert "decoder_graph" not in plain.manifest and "com.microsoft.GroupQueryAttention" not in plain.manifest["ops"][
        "decoder"]


def test_tied_qwen2_with_biases(ctx, tmp_path):
    """Qwen2: q/k/v biases and an lm_head tied to the embedding table (read from embed_tokens.bin)."""
    from export_tiny_model import checkpoint_model

    from medlite.export import export_onnx

    qwen = checkpoint_model("tiny-qwen2", "legacy", tmp_path / "ckpt", ctx)
    for graph in ("plain", "fused"):
        res = export_onnx(qwen, tmp_path / graph, ctx=ctx, components=["decoder"], decoder_graph=graph)
        assert res.tied_embeddings and (tmp_path / graph / "embed_tokens.bin").is_file()
    proto = onnx.load(str(tmp_path / "fused" / "decoder.onnx"), load_external_data=False)
    assert any(t.name == "embed_tokens.weight" for t in proto.graph.initializer)     # the table, stored once
    sp, sf = _session(tmp_path / "plain" / "decoder.onnx"), _session(tmp_path / "fused" / "decoder.onnx")
    feed = _feeds(sp, 2, 3, 5, [0, 2])
    want, got = sp.run(None, feed), sf.run(None, feed)
    assert np.abs(got[0] - want[0]).max() <= 1e-5 * np.abs(want[0]).max()
