"""ONNX (fp32) graphs vs transformers' own model: vision, embed, prefill, decode, KV cache."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export_tiny_model import checkpoint_model, dims, tiny_loaded

TOL = 1e-4


def _sess(folder, name):
    return ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _past_names(n_layers):
    return [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]


def _zeros_past(d, batch, slots=1):
    return [np.zeros((batch, d["kv"], slots, d["hd"]), np.float32) for _ in range(2 * d["layers"])]


def _run_decoder(sess, embeds, mask, pos, past):
    feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask.astype(np.int32),
            "position_ids": pos.astype(np.int32)}
    feed.update(dict(zip(_past_names(len(past) // 2), past)))
    out = sess.run(None, feed)
    return out[0], out[1:]


@torch.no_grad()
def _hf_logits(model, embeds: np.ndarray) -> np.ndarray:
    """transformers' language model + lm_head on full sequences, no cache (the reference)."""
    hs = model.model.language_model(inputs_embeds=torch.from_numpy(embeds)).last_hidden_state
    return model.lm_head(hs).numpy()


def _vision_ref(loaded, px):
    cfg = loaded.model.config
    with torch.no_grad():
        feats = loaded.model.model.get_image_features(
            torch.from_numpy(px), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
    return torch.stack(list(feats)).numpy()


@pytest.mark.parametrize("batch", [1, 3])
def test_vision_matches_get_image_features(tiny, exported, batch):
    folder, _ = exported
    px = np.random.default_rng(batch).standard_normal((batch, 3, 28, 28)).astype(np.float32)
    (got,) = _sess(folder, "vision").run(None, {"pixel_values": px})
    ref = _vision_ref(tiny, px)
    assert got.shape == ref.shape == (batch, tiny.num_image_tokens, dims(tiny)["hidden"])
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("variant", ["factory", "hidden_states[-2]"])
def test_vision_feature_selection_variants(ctx, tmp_path, variant):
    """Factory's first-token drop, and a layer before the last (dead last layer), are reproduced."""
    from medlite.export import export_onnx

    if variant == "factory":
        loaded = checkpoint_model("tiny", "factory", tmp_path, ctx)
    else:
        loaded = tiny_loaded(feature_layer=-2, strategy="default", seed=3)
    export_onnx(loaded, tmp_path / "onnx", ctx=ctx, components=("vision",))
    px = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    (got,) = _sess(tmp_path / "onnx", "vision").run(None, {"pixel_values": px})
    ref = _vision_ref(loaded, px)
    assert got.shape == ref.shape and got.shape[1] == loaded.num_image_tokens
    assert np.abs(got - ref).max() <= TOL


def test_embed_is_the_table(tiny, exported):
    folder, _ = exported
    v = dims(tiny)["vocab"]
    ids = np.array([[0, 5, tiny.image_token_id, 7], [1, 2, 3, v - 1]], dtype=np.int32)
    (got,) = _sess(folder, "embed").run(None, {"input_ids": ids})
    table = tiny.model.model.language_model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(got, table[ids])


def test_prefill_with_dummy_slot_equals_no_past(tiny, exported):
    """(batch, seq, past) = (1, 4, 1): one zero slot with mask 0 changes nothing."""
    folder, _ = exported
    d = dims(tiny)
    x = np.random.default_rng(0).standard_normal((1, 4, d["hidden"])).astype(np.float32)
    logits, present = _run_decoder(_sess(folder, "decoder"), x, np.array([[0, 1, 1, 1, 1]]), np.arange(4)[None],
                                   _zeros_past(d, 1))
    assert np.abs(logits - _hf_logits(tiny.model, x)).max() <= TOL
    assert all(p.shape == (1, d["kv"], 5, d["hd"]) for p in present)
    assert all(np.all(p[:, :, 0] == 0) for p in present)  # the dummy slot passes through untouched


@pytest.mark.parametrize("batch,seq,prefix", [(2, 1, 6), (1, 9, 2), (2, 3, 4)])
def test_decode_with_cache_equals_full_recompute(tiny, exported, batch, seq, prefix):
    """Prefill a prefix, then run ``seq`` new tokens against past = 1 + prefix slots."""
    folder, _ = exported
    d = dims(tiny)
    sess = _sess(folder, "decoder")
    full = np.random.default_rng(batch * 100 + seq).standard_normal((batch, prefix + seq, d["hidden"])).astype(np.float32)
    mask = np.concatenate([np.zeros((batch, 1)), np.ones((batch, prefix))], axis=1)
    _, present = _run_decoder(sess, full[:, :prefix], mask, np.tile(np.arange(prefix), (batch, 1)),
                              _zeros_past(d, batch))
    assert present[0].shape[2] == 1 + prefix
    mask2 = np.concatenate([mask, np.ones((batch, seq))], axis=1)
    pos2 = np.tile(np.arange(prefix, prefix + seq), (batch, 1))
    logits, present2 = _run_decoder(sess, full[:, prefix:], mask2, pos2, present)
    ref = _hf_logits(tiny.model, full)[:, prefix:]
    assert logits.shape == (batch, seq, d["vocab"])
    assert np.abs(logits - ref).max() <= TOL
    assert present2[0].shape[2] == 1 + prefix + seq


@torch.no_grad()
def test_random_past_matches_transformers_cache(tiny, exported):
    """Against transformers' own DynamicCache + causal mask (independent of the export's mask code)."""
    from transformers import DynamicCache

    folder, _ = exported
    d = dims(tiny)
    rng = np.random.default_rng(7)
    b, s, p = 2, 3, 5
    x = rng.standard_normal((b, s, d["hidden"])).astype(np.float32)
    past = [rng.standard_normal((b, d["kv"], p, d["hd"])).astype(np.float32) for _ in range(2 * d["layers"])]
    pos = np.tile(np.arange(p, p + s), (b, 1))
    logits, present = _run_decoder(_sess(folder, "decoder"), x, np.ones((b, p + s)), pos, past)
    cache = DynamicCache()
    for i in range(d["layers"]):
        cache.update(torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1]), i)
    out = tiny.model.model.language_model(inputs_embeds=torch.from_numpy(x), past_key_values=cache,
                                          attention_mask=torch.ones(b, p + s, dtype=torch.long),
                                          position_ids=torch.from_numpy(pos).long(), use_cache=True)
    ref = tiny.model.lm_head(out.last_hidden_state).numpy()
    assert np.abs(logits - ref).max() <= TOL
    for got, layer in zip(present[::2], out.past_key_values.layers):
        assert np.abs(got - layer.keys.numpy()).max() <= TOL


def test_left_padding_does_not_change_a_row(tiny, exported):
    """A short row left-padded in a batch gives the logits it gives alone."""
    folder, _ = exported
    d = dims(tiny)
    rng = np.random.default_rng(11)
    long_x = rng.standard_normal((5, d["hidden"])).astype(np.float32)
    short_x = rng.standard_normal((3, d["hidden"])).astype(np.float32)
    x = np.zeros((2, 5, d["hidden"]), np.float32)
    x[0], x[1, 2:] = long_x, short_x
    mask = np.array([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    pos = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    logits, _ = _run_decoder(_sess(folder, "decoder"), x, mask, pos, _zeros_past(d, 2))
    assert np.isfinite(logits).all()
    assert np.abs(logits[0] - _hf_logits(tiny.model, long_x[None])[0]).max() <= TOL
    assert np.abs(logits[1, 2:] - _hf_logits(tiny.model, short_x[None])[0]).max() <= TOL


def test_greedy_steps_with_cache_equal_full_recompute(tiny, exported):
    """Six greedy steps through the KV cache pick the same tokens and logits as full recomputation."""
    folder, _ = exported
    d = dims(tiny)
    sess = _sess(folder, "decoder")
    table = tiny.model.model.language_model.get_input_embeddings().weight.detach().numpy()
    ids = [1, 20, 30, 40]
    logits, past = _run_decoder(sess, table[ids][None], np.array([[0, 1, 1, 1, 1]]), np.arange(4)[None],
                                _zeros_past(d, 1))
    mask = np.array([[0, 1, 1, 1, 1]])
    for _ in range(6):
        ref = _hf_logits(tiny.model, table[ids][None])[0, -1]
        assert np.abs(logits[0, -1] - ref).max() <= TOL
        t = int(logits[0, -1].argmax())
        assert t == int(ref.argmax())
        ids.append(t)
        mask = np.concatenate([mask, [[1]]], axis=1)
        logits, past = _run_decoder(sess, table[[t]][None], mask, np.array([[len(ids) - 1]]), past)


@pytest.mark.parametrize("preset,fmt", [("tiny-phi", "legacy"), ("tiny-qwen2", "factory"), ("tiny-stablelm", "hf")])
def test_other_text_backbones(ctx, tmp_path, preset, fmt):
    """Phi (LayerNorm, partial rotary, lm_head bias), Qwen2 (tied, qkv bias), StableLM: prefill + decode."""
    from medlite.export import export_onnx
    from medlite.export.trt_ops import trt_check_from_onnx

    loaded = checkpoint_model(preset, fmt, tmp_path, ctx)
    res = export_onnx(loaded, tmp_path / "onnx", ctx=ctx, components=("decoder",))
    assert res.trt_ok and trt_check_from_onnx(tmp_path / "onnx" / "decoder.onnx").ok
    d = dims(loaded)
    sess = _sess(tmp_path / "onnx", "decoder")
    full = np.random.default_rng(1).standard_normal((2, 7, d["hidden"])).astype(np.float32)
    mask = np.concatenate([np.zeros((2, 1)), np.ones((2, 5))], axis=1)
    l1, present = _run_decoder(sess, full[:, :5], mask, np.tile(np.arange(5), (2, 1)), _zeros_past(d, 2))
    l2, _ = _run_decoder(sess, full[:, 5:], np.concatenate([mask, np.ones((2, 2))], axis=1),
                         np.tile(np.arange(5, 7), (2, 1)), present)
    ref = _hf_logits(loaded.model, full)
    assert np.abs(np.concatenate([l1, l2], axis=1) - ref).max() <= TOL
