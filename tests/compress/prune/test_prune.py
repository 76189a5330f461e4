"""Structured pruning on a random tiny checkpoint, against independent references:

* importance scores == plain torch forward hooks on transformers' own Llava forward, sample by sample;
* a pruned model == the unpruned model with the removed channels / heads zeroed (a masked forward);
* save_pretrained → LlavaForConditionalGeneration.from_pretrained gives the same logits;
* the fp32 ONNX export of the pruned model answers like PyTorch.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from compress_state import make_state
from medlite.checkpoints import load_model
from medlite.compress.prune import importance as imp
from medlite.compress.prune import structured
from medlite.compress.prune.options import PruneOptions
from medlite.compress.prune.stage import run


@pytest.fixture()
def tiny(tiny_path, cctx):
    return load_model(tiny_path, ctx=cctx)


def _hf_forward(loaded, sample, hooks=()):
    """One unpadded sample through LlavaForConditionalGeneration (the reference path)."""
    from medlite.checkpoints.generate import pixel_values, prompt_ids

    ids = torch.tensor([prompt_ids(loaded, sample.question)])
    with torch.no_grad():
        return loaded.model(input_ids=ids, pixel_values=pixel_values(loaded, sample.load_image())).logits[0]


def test_activation_importance_equals_plain_hooks(tiny, calib, cctx):
    from medlite.calibration.forward import ForwardLoop

    samples = calib.samples[:6]
    got = imp.activation_importance(ForwardLoop(tiny, samples, batch_size=4, ctx=cctx), tiny.model)
    layers = tiny.model.model.language_model.layers
    sq_mlp = [0.0] * len(layers)
    sq_o = [0.0] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def mlp_hook(_m, args, i=i):
            sq_mlp[i] = sq_mlp[i] + (args[0][0].double() ** 2).sum(0)

        def o_hook(_m, args, i=i):
            sq_o[i] = sq_o[i] + (args[0][0].double() ** 2).sum(0)
        handles += [layer.mlp.down_proj.register_forward_pre_hook(mlp_hook),
                    layer.self_attn.o_proj.register_forward_pre_hook(o_hook)]
    try:
        for s in samples:
            _hf_forward(tiny, s)
    finally:
        for h in handles:
            h.remove()
    nh, nkv, hd = imp.head_layout(tiny.model.config.text_config)
    for i in range(len(layers)):
        torch.testing.assert_close(got.mlp[i], sq_mlp[i].sqrt(), rtol=1e-4, atol=1e-6)
        heads = sq_o[i].view(nh, hd).sum(1)
        torch.testing.assert_close(got.heads[i], heads.sqrt(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.groups[i], heads.view(nkv, nh // nkv).sum(1).sqrt(), rtol=1e-4, atol=1e-6)
    assert got.samples == 6 and got.tokens == sum(len(_hf_forward(tiny, s)) for s in samples)


def test_layer_importance_equals_skipped_forward(tiny, calib, cctx):
    from medlite.calibration.forward import ForwardLoop

    samples = calib.samples[:4]
    got, tokens = imp.layer_importance(ForwardLoop(tiny, samples, batch_size=3, ctx=cctx), tiny.model)
    layers = tiny.model.model.language_model.layers
    ref = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    for s in samples:
        full = torch.log_softmax(_hf_forward(tiny, s).double(), -1)
        n += full.shape[0]
        for i, layer in enumerate(layers):
            h = layer.register_forward_hook(lambda _m, args, out: args[0])
            try:
                skip = torch.log_softmax(_hf_forward(tiny, s).double(), -1)
            finally:
                h.remove()
            ref[i] += (full.exp() * (full - skip)).sum(-1).sum()
    assert tokens == n
    torch.testing.assert_close(got, ref / n, rtol=1e-4, atol=1e-7)


def _logits(loaded, samples):
    return torch.stack([_hf_forward(loaded, s)[-1] for s in samples])


def test_pruned_model_equals_masked_original(tiny_path, calib, cctx):
    """Removing channels / KV groups == zeroing their contribution in the unpruned model."""
    a, b = load_model(tiny_path, ctx=cctx), load_model(tiny_path, ctx=cctx)
    layers = a.model.model.language_model.layers
    nh, nkv, hd = imp.head_layout(a.model.config.text_config)
    keep_ch = [torch.tensor([0, 3, 5, 7] + list(range(40, 100))) for _ in layers]
    keep_g = [torch.tensor([1]), torch.tensor([0])]
    structured.prune_mlp(a.model, keep_ch)
    structured.prune_kv_groups(a.model, keep_g)
    with torch.no_grad():
        for layer, ch, g in zip(b.model.model.language_model.layers, keep_ch, keep_g):
            drop = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
            drop[ch] = False
            layer.mlp.down_proj.weight[:, drop] = 0
            cols = torch.ones(nh * hd, dtype=torch.bool)
            per = nh // nkv
            for gg in g.tolist():
                cols[gg * per * hd:(gg + 1) * per * hd] = False
            layer.self_attn.o_proj.weight[:, cols] = 0
    assert a.model.config.text_config.num_attention_heads == 2 and a.model.config.text_config.head_dim == hd
    torch.testing.assert_close(_logits(a, calib.samples[:3]), _logits(b, calib.samples[:3]), rtol=1e-5, atol=1e-5)


def test_stage_round_trip_and_onnx(tiny, calib, cctx, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from medlite.export import export_onnx
    from medlite.runtime import OnnxVlm

    before = tiny.param_breakdown()["total"]
    state = make_state(cctx, tiny, calib)
    res = run(state, 0, PruneOptions(mlp=0.25, attention_kv_groups=0.5, layers=1))
    cfg = tiny.model.config.text_config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == \
        (96, 2, 1, 1)
    assert res.bytes_before == before["bytes"] and res.bytes_after < res.bytes_before
    assert res.manifest["params_after"] == tiny.param_breakdown()["total"]["params"]
    assert len(res.manifest["layers"]["skip_kl"]) == 2 and res.report
    tiny.model.save_pretrained(tmp_path / "hf")
    again = dataclasses.replace(tiny, model=LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf"))
    held = calib.heldout[:6]
    for s in held:   # whole prompts with their images: every position's logits
        assert (_hf_forward(again, s) - _hf_forward(tiny, s)).abs().max() <= 1e-5
    export_onnx(tiny, tmp_path / "onnx", ctx=cctx, precision="fp32")
    from medlite.checkpoints.generate import answer_batch

    vlm = OnnxVlm.open(tmp_path / "onnx")
    images = [s.load_image() for s in held]
    questions = [s.question for s in held]
    assert vlm.answer_batch(images, questions, max_new_tokens=8) == answer_batch(tiny, images, questions,
                                                                                 max_new_tokens=8)


def test_vision_layers_keep_the_feature_layer_when_it_survives(tiny_path, cctx, calib):
    from medlite.calibration.forward import image_features

    a = load_model(tiny_path, ctx=cctx)
    # make the projector read layer 1 of 2: removing the top layer leaves the features unchanged
    a.model.config.vision_feature_layer = -2
    pix = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = image_features(a.model, pix)
    facts = structured.drop_vision_layers(a.model, 1)
    assert facts["features_unchanged"] and a.model.config.vision_config.num_hidden_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(image_features(a.model, pix), ref, rtol=0, atol=0)
    warned = []
    b = load_model(tiny_path, ctx=cctx)   # feature layer -1 (the top): it goes, the projector reads the new top
    structured.drop_vision_layers(b.model, 1, warn=warned.append)
    assert warned and b.model.config.vision_feature_layer == -1


def test_bad_amounts_are_clear_errors(tiny, calib, cctx):
    from medlite.errors import MedliteError

    with pytest.raises(MedliteError, match="layers 2: the decoder has 2 layers"):
        run(make_state(cctx, tiny, calib), 0, PruneOptions(layers=2))
    with pytest.raises(MedliteError, match="removes no group"):
        run(make_state(cctx, tiny, calib), 0, PruneOptions(attention_kv_groups=0.2))
