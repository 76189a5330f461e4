"""Files an export writes: deterministic bytes, tied table stored once, external data, runtime config."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from export_tiny_model import checkpoint_model, dims
from medlite.errors import DataError, ExportError
from medlite.export import export_onnx
from medlite.runtime.config import RuntimeConfig

FILES = {"vision.onnx", "embed.onnx", "decoder.onnx", "embed_tokens.bin", "tokenizer.json", "medlite_runtime.json"}


def test_two_exports_give_identical_bytes(tiny, ctx, exported, tmp_path):
    folder, first = exported
    again = export_onnx(tiny, tmp_path, ctx=ctx)
    assert set(first.files) == set(again.files) == FILES
    for name in FILES:
        assert (folder / name).read_bytes() == (tmp_path / name).read_bytes(), name
    model = onnx.load(str(folder / "decoder.onnx"))
    assert model.producer_name == "medlite" and not model.graph.doc_string
    assert all(not n.doc_string for n in model.graph.node)


def test_result_lists_files_ops_and_checks(exported):
    folder, res = exported
    for name, info in res.files.items():
        assert info["bytes"] == (folder / name).stat().st_size
    assert res.opset == 17 and res.precision == "fp32" and res.trt_ok
    assert res.ops["embed"] == {"Gather": 1}
    assert res.ops["decoder"]["MatMul"] >= 2 * 7 + 1      # q,k,v,o,gate,up,down per layer + lm_head
    assert json.loads(json.dumps(res.to_dict()))["trt_ok"] is True


def test_embedding_table_file_is_the_table(tiny, exported):
    folder, _ = exported
    cfg = RuntimeConfig.load(folder)
    t = cfg.embedding_table
    raw = np.fromfile(folder / t["file"], dtype=t["dtype"]).reshape(t["shape"])
    np.testing.assert_array_equal(raw, tiny.model.model.language_model.get_input_embeddings().weight.detach().numpy())
    embed = onnx.load(str(folder / "embed.onnx"), load_external_data=False)
    (init,) = embed.graph.initializer
    assert init.data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in init.external_data}["location"] == "embed_tokens.bin"


def test_tied_lm_head_is_stored_once(ctx, tmp_path):
    """Qwen2-style tied embeddings: the table lives only in embed_tokens.bin, read by both graphs."""
    loaded = checkpoint_model("tiny-qwen2", "factory", tmp_path, ctx)
    m = loaded.model
    assert m.lm_head.weight is m.model.language_model.get_input_embeddings().weight
    d = dims(loaded)
    res = export_onnx(loaded, tmp_path / "onnx", ctx=ctx)
    assert res.tied_embeddings
    dec = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"), load_external_data=False)
    ext = [i for i in dec.graph.initializer if i.data_location == TensorProto.EXTERNAL]
    assert [i.name for i in ext] == ["embed_tokens.weight"]
    assert {e.key: e.value for e in ext[0].external_data}["location"] == "embed_tokens.bin"
    # no second [hidden, vocab] copy inside the decoder
    assert not [i for i in dec.graph.initializer if sorted(i.dims) == sorted([d["hidden"], d["vocab"]])
                and i.data_location != TensorProto.EXTERNAL]
    inside = sum(len(i.raw_data) for i in dec.graph.initializer)
    emb = m.model.language_model.get_input_embeddings().weight
    llm = sum(p.numel() * 4 for p in m.model.language_model.parameters() if p is not emb)
    assert llm <= inside < llm + emb.numel() * 4 // 2   # the layers' weights, but no lm_head copy
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, d["hidden"])).astype(np.float32)
    feed = {"inputs_embeds": x, "attention_mask": np.array([[0, 1, 1, 1]], np.int32),
            "position_ids": np.arange(3, dtype=np.int32)[None]}
    feed.update({f"past_key_values.{i}.{k}": np.zeros((1, d["kv"], 1, d["hd"]), np.float32)
                 for i in range(d["layers"]) for k in ("key", "value")})
    logits = sess.run(["logits"], feed)[0]
    with torch.no_grad():
        ref = m.lm_head(m.model.language_model(inputs_embeds=torch.from_numpy(x)).last_hidden_state).numpy()
    assert np.abs(logits - ref).max() <= 1e-4


def test_large_graph_uses_external_data(tiny, exported, tmp_path):
    """Above the threshold weights go to <graph>.onnx.data; ORT and onnx.checker read it back."""
    from medlite.export.files import check_onnx_file, write_onnx

    folder, _ = exported
    model = onnx.load(str(folder / "vision.onnx"))
    written = write_onnx(model, tmp_path / "vision.onnx", external_threshold=0)
    assert [p.name for p in written] == ["vision.onnx", "vision.onnx.data"]
    assert (tmp_path / "vision.onnx").stat().st_size < 50_000 < (tmp_path / "vision.onnx.data").stat().st_size
    check_onnx_file(tmp_path / "vision.onnx")
    px = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
    a = ort.InferenceSession(str(folder / "vision.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": px})
    b = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": px})
    np.testing.assert_array_equal(a[0], b[0])


def _memory_dims(loaded) -> dict:
    tc, vc = loaded.model.config.text_config, loaded.model.config.vision_config
    return {"num_attention_heads": tc.num_attention_heads, "intermediate_size": tc.intermediate_size,
            "vision_hidden_size": vc.hidden_size, "vision_intermediate_size": vc.intermediate_size,
            "vision_num_attention_heads": vc.num_attention_heads,
            "vision_tokens": (vc.image_size // vc.patch_size) ** 2}


def test_runtime_config_describes_the_export(tiny, exported):
    folder, _ = exported
    cfg = RuntimeConfig.load(folder)
    d = dims(tiny)
    n_img, img_id = tiny.num_image_tokens, tiny.image_token_id
    assert cfg.image_token_id == img_id and cfg.num_image_tokens == n_img and cfg.suppress_token_ids == [img_id]
    assert cfg.eos_token_ids == tiny.eos_token_ids and cfg.bos_token_id == tiny.bos_token_id
    assert cfg.pad_token_id == tiny.pad_token_id
    assert cfg.model == {"hidden_size": d["hidden"], "num_layers": d["layers"], "num_kv_heads": d["kv"],
                         "head_dim": d["hd"], "vocab_size": d["vocab"],
                         "max_position_embeddings": tiny.model.config.text_config.max_position_embeddings,
                         **_memory_dims(tiny)}
    assert cfg.image_spec == tiny.image_spec and cfg.template == tiny.template
    assert cfg.source == tiny.source.to_dict() and cfg.model_name == tiny.name
    assert cfg.kv_cache["convention"] == "dummy_slot" and cfg.kv_cache["prefill_past_slots"] == 1
    dec = cfg.graphs["decoder"]
    assert dec.input("attention_mask").dtype == "int32" and dec.input("attention_mask").shape == ["batch", "total"]
    assert dec.input("past_key_values.1.value").shape == ["batch", d["kv"], "past", d["hd"]]
    assert dec.output("present.0.key").shape == ["batch", d["kv"], "total", d["hd"]]
    assert dec.output("logits").dtype == "float32" and dec.output("logits").shape == ["batch", "seq", d["vocab"]]
    assert cfg.graphs["vision"].input("pixel_values").shape == ["batch", 3, 28, 28]
    assert cfg.graphs["vision"].output("image_embeds").shape == ["batch", n_img, d["hidden"]]
    assert cfg.graphs["embed"].input("input_ids").dtype == "int32"
    assert cfg.opset == 17 and cfg.precision == "fp32"
    assert all(v["ok"] for v in cfg.trt_check.values())
    # the saved tokenizer is the model's
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode("is there a lesion").ids == tiny.tokenizer.encode("is there a lesion").ids
    assert tok.to_str() == tiny.tokenizer.to_str()


def test_runtime_config_errors_name_the_key(exported, tmp_path):
    folder, _ = exported
    raw = json.loads((folder / "medlite_runtime.json").read_text())
    del raw["kv_cache"]["past_name"]
    (tmp_path / "medlite_runtime.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"kv_cache\.'past_name'"):
        RuntimeConfig.load(tmp_path)
    raw["schema_version"] = 99
    (tmp_path / "medlite_runtime.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="schema_version 99"):
        RuntimeConfig.load(tmp_path)
    with pytest.raises(DataError, match="not found"):
        RuntimeConfig.load(tmp_path / "nowhere")


def test_bad_arguments_raise_export_errors(tiny, ctx, tmp_path):
    with pytest.raises(ExportError, match="opset 18"):
        export_onnx(tiny, tmp_path, ctx=ctx, opset=18)
    with pytest.raises(ExportError, match="components"):
        export_onnx(tiny, tmp_path, ctx=ctx, components=("lm",))
    with pytest.raises(ExportError, match="precision 'int8'"):
        export_onnx(tiny, tmp_path, ctx=ctx, precision="int8")


def test_partial_export_removes_stale_files(tiny, ctx, tmp_path):
    (tmp_path / "decoder.onnx.data").write_bytes(b"stale")
    (tmp_path / "unrelated.txt").write_text("keep")
    res = export_onnx(tiny, tmp_path, ctx=ctx, components=("embed",))
    assert set(res.files) == {"embed.onnx", "embed_tokens.bin", "tokenizer.json", "medlite_runtime.json"}
    assert not (tmp_path / "decoder.onnx.data").exists() and (tmp_path / "unrelated.txt").exists()
    assert list(RuntimeConfig.load(tmp_path).graphs) == ["embed"]


def test_folding_removes_int64_constant_of_shape(tmp_path):
    """The exporter's dynamic Expand pattern folds away and the graph computes the same."""
    from medlite.export.graph_passes import folded_onnx_from_onnx, op_counts

    class Rep(torch.nn.Module):
        def forward(self, x):
            b, h, s, d = x.shape
            return x[:, :, None].expand(b, h, 3, s, d).reshape(b, h * 3, s, d)

    path = tmp_path / "rep.onnx"
    torch.onnx.export(Rep(), (torch.randn(2, 2, 5, 4),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 2: "s"}}, opset_version=17, dynamo=False)
    raw = onnx.load(str(path))
    assert "ConstantOfShape" in op_counts(raw)
    folded = folded_onnx_from_onnx(onnx.load(str(path)))
    assert "ConstantOfShape" not in op_counts(folded)
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 2, 7, 4)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run(raw), run(folded))
    assert run(folded).shape == (3, 6, 7, 4)


def test_staged_external_weights_are_copied_not_loaded(exported, tmp_path):
    """Graphs over 2 GB come from the exporter with weights in per-tensor files; write_onnx streams them."""
    from medlite.export.files import write_onnx
    from medlite.export.trace import _absolute_external_locations

    folder, _ = exported
    stage = tmp_path / "stage"
    stage.mkdir()
    onnx.save(onnx.load(str(folder / "vision.onnx")), str(stage / "v.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    px = np.random.default_rng(1).standard_normal((2, 3, 28, 28)).astype(np.float32)
    ref = ort.InferenceSession(str(folder / "vision.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": px})[0]
    for threshold, files in ((0, ["vision.onnx", "vision.onnx.data"]), (1 << 40, ["vision.onnx"])):
        model = onnx.load(str(stage / "v.onnx"), load_external_data=False)
        assert _absolute_external_locations(model, stage)
        out = tmp_path / f"out{threshold}"
        out.mkdir()
        assert [p.name for p in write_onnx(model, out / "vision.onnx", external_threshold=threshold)] == files
        got = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": px})[0]
        np.testing.assert_array_equal(got, ref)
        onnx.checker.check_model(str(out / "vision.onnx"), full_check=True)


def test_staging_weights_changes_no_byte(tiny, ctx, exported, tmp_path, monkeypatch):
    """The low-memory path (weights staged to disk during the graph passes) writes identical files."""
    import medlite.export.trace as trace

    monkeypatch.setattr(trace, "STAGE_MIN_BYTES", 1)
    folder, first = exported
    again = export_onnx(tiny, tmp_path, ctx=ctx)
    assert again.files == first.files
    assert not (tmp_path / ".medlite-export-tmp").exists()
