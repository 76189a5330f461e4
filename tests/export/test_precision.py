"""fp16 export: interface dtypes, fp32 islands, closeness to fp32, caller's model untouched."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export_tiny_model import dims
from medlite.errors import ExportError
from medlite.export.precision import check_fp32_islands, fp16_islands_from_onnx, model_for_precision
from medlite.runtime.config import RuntimeConfig


def _sess(folder, name):
    return ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def test_fp16_interface_dtypes(tiny, exported_fp16):
    folder, res = exported_fp16
    cfg = RuntimeConfig.load(folder)
    assert cfg.precision == "fp16" and cfg.kv_cache["dtype"] == "float16"
    g = cfg.graphs
    assert g["vision"].input("pixel_values").dtype == "float32"      # preprocessing precision
    assert g["vision"].output("image_embeds").dtype == "float16"
    assert g["embed"].output("inputs_embeds").dtype == "float16"
    assert g["decoder"].input("inputs_embeds").dtype == "float16"
    assert g["decoder"].input("past_key_values.0.key").dtype == "float16"
    assert g["decoder"].output("present.1.value").dtype == "float16"
    assert g["decoder"].output("logits").dtype == "float32"          # argmax/scoring in fp32
    assert cfg.embedding_table["dtype"] == "float16"
    assert res.files["embed_tokens.bin"]["bytes"] == dims(tiny)["vocab"] * dims(tiny)["hidden"] * 2


def test_fp16_graphs_keep_norms_and_softmax_in_fp32(exported_fp16):
    folder, res = exported_fp16
    for name in ("vision", "decoder"):
        islands = fp16_islands_from_onnx(onnx.load(str(folder / f"{name}.onnx")))
        assert all(c["fp16"] == 0 for c in islands.values()), (name, islands)
        assert islands["Softmax"]["fp32"] == 2 and islands["ReduceMean"]["fp32"] > 0
        assert res.fp32_ops[name] == islands
    # the weights really are fp16
    dec = onnx.load(str(folder / "decoder.onnx"))
    big = [i for i in dec.graph.initializer if np.prod(i.dims) >= 1024]
    assert big and all(i.data_type == TensorProto.FLOAT16 for i in big)


def test_fp16_softmax_is_rejected():
    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match="Softmax"):
        check_fp32_islands(m, "toy")


def test_fp16_close_to_fp32(tiny, exported, exported_fp16):
    """Same inputs through both precisions: small relative error, same greedy token."""
    d = dims(tiny)
    f32, _ = exported
    f16, _ = exported_fp16
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    a = _sess(f32, "vision").run(None, {"pixel_values": px})[0]
    b = _sess(f16, "vision").run(None, {"pixel_values": px})[0].astype(np.float32)
    assert np.abs(a - b).max() <= 2e-2 * max(1.0, np.abs(a).max())
    x = rng.standard_normal((1, 6, d["hidden"])).astype(np.float32)
    feed = {"attention_mask": np.array([[0] + [1] * 6], np.int32), "position_ids": np.arange(6, dtype=np.int32)[None]}
    outs = []
    for folder, dt in ((f32, np.float32), (f16, np.float16)):
        f = dict(feed, inputs_embeds=x.astype(dt))
        f.update({f"past_key_values.{i}.{k}": np.zeros((1, d["kv"], 1, d["hd"]), dt)
                  for i in range(d["layers"]) for k in ("key", "value")})
        outs.append(_sess(folder, "decoder").run(["logits"], f)[0])
    l32, l16 = outs
    assert np.isfinite(l16).all()
    assert np.abs(l32 - l16).max() <= 2e-2 * np.abs(l32).max()
    assert (l32.argmax(-1) == l16.argmax(-1)).mean() >= 5 / 6


def test_conversion_leaves_the_callers_model_alone(tiny, ctx):
    before = tiny.model.lm_head.weight.detach().clone()
    half = model_for_precision(tiny, "fp16", ctx=ctx)
    assert half is not tiny.model and next(half.parameters()).dtype == torch.float16
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert torch.equal(tiny.model.lm_head.weight, before)
    assert model_for_precision(tiny, "fp32", ctx=ctx) is tiny.model


@pytest.mark.parametrize("graph", ["vision", "embed", "decoder"])
def test_graph_copy_holds_only_what_the_graph_runs(tiny, ctx, graph):
    """A per-graph fp16 copy converts the modules the graph runs exactly as a whole-model copy does,
    and leaves the others empty (no memory for weights the trace never touches)."""
    whole = dict(model_for_precision(tiny, "fp16", ctx=ctx).named_parameters())
    part = dict(model_for_precision(tiny, "fp16", ctx=ctx, graph=graph).named_parameters())
    assert part.keys() == whole.keys()
    runs = {"vision": ("vision_tower", "multi_modal_projector"), "embed": ("embed_tokens",),
            "decoder": ("language_model", "lm_head")}[graph]
    for name, p in part.items():
        if any(k in name for k in runs):
            assert p.dtype == torch.float16 and torch.equal(p, whole[name]), name
        else:
            assert p.numel() == 0, name
    assert all(p.numel() > 0 for p in tiny.model.parameters())      # the caller's model is untouched


def test_export_restores_attention_and_layer_norms(tiny, exported):
    """The export swaps attention and LayerNorm only while tracing."""
    cfg = tiny.model.config
    assert cfg.text_config._attn_implementation != "medlite_fp32_softmax"
    assert cfg.vision_config._attn_implementation != "medlite_fp32_softmax"
    lns = [m for m in tiny.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(lns) >= 4


def test_fp32_export_parks_what_each_trace_never_runs(tiny, ctx, tmp_path, monkeypatch):
    """An fp32 export traces the caller's model itself: while the vision graph is traced the decoder's
    weights are parked on disk (empty), while the decoder is traced the tower's; after the export every
    weight is back bit-exactly and the graphs equal an export without parking (same bytes)."""
    import medlite.export.api as api

    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    seen = {}

    def spy(fn, graph):
        def wrapped(model, *a, **k):
            seen[graph] = {n: p.numel() for n, p in model.named_parameters()}
            return fn(model, *a, **k)
        return wrapped

    monkeypatch.setattr(api, "vision_onnx_from_model", spy(api.vision_onnx_from_model, "vision"))
    monkeypatch.setattr(api, "decoder_onnx_from_model", spy(api.decoder_onnx_from_model, "decoder"))
    real_write, writing = api.write_onnx, []

    def write(*a, **k):     # writing and checking a graph park every torch weight
        writing.append(max(p.numel() for p in tiny.model.parameters()))
        return real_write(*a, **k)

    monkeypatch.setattr(api, "write_onnx", write)
    res = api.export_onnx(tiny, tmp_path / "parked", ctx=ctx)
    assert writing == [0, 0, 0]
    assert not (tmp_path / "parked" / ".medlite-export-park").exists()
    assert any("language_model.layers" in n for n in seen["vision"])
    for n, numel in seen["vision"].items():
        assert (numel == 0) == ("language_model" in n or "lm_head" in n), n
    for n, numel in seen["decoder"].items():
        assert (numel == 0) == ("vision_tower" in n or "multi_modal_projector" in n), n
    after = tiny.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    monkeypatch.setattr(api, "modules_idle_for", lambda model, graph: [])
    ref = api.export_onnx(tiny, tmp_path / "unparked", ctx=ctx)
    assert {k: v["sha256"] for k, v in res.files.items()} == {k: v["sha256"] for k, v in ref.files.items()}
