"""Exact smoothing of the no-norm INT8 inputs (v_proj → o_proj with GQA, up_proj → down_proj, SigLIP
v_proj → out_proj): the model's outputs do not move, and each balance layer's per-channel input absmax
becomes max|X_j| / s_j with s computed here independently in numpy from the SmoothQuant formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from int8_fixtures import int8_state, quantize_recipe
from medlite.errors import RecipeError
from medlite.recipes import load_recipe
from medlite.recipes.options import QuantizeOptions

ALPHA = 0.5
BOTH = ["attn_out", "mlp_down"]


def _load(tiny_path, cctx):
    from medlite.checkpoints import load_model

    return load_model(tiny_path, ctx=cctx)


def _outputs(lm, loop) -> list:
    """Logits at the real (unpadded) positions, and the image features, per batch."""
    from medlite.checkpoints.generate import image_features

    out = []
    for inp in loop.batches(lm.model):
        with torch.no_grad():
            h = lm.model.model.language_model(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                                              position_ids=inp.position_ids, use_cache=False).last_hidden_state
            out.append(lm.model.lm_head(h)[inp.attention_mask.bool()].clone())
            out.append(image_features(lm.model, inp.pixel_values).clone())
    return out


def _balance_inputs(lm, loop, names) -> dict:
    """{module name: per-channel absmax of its input (numpy)} over the real positions, own hooks."""
    mods = dict(lm.model.named_modules())
    acc, cur = {}, {}

    def hook(name):
        def pre(_m, args):
            x = args[0].detach().numpy()
            if "language_model" in name:
                x = x[cur["mask"]]
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            acc[name] = m if name not in acc else np.maximum(acc[name], m)
        return pre

    hs = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for inp in loop.batches(lm.model):
            cur["mask"] = inp.attention_mask.numpy().astype(bool)
            with torch.no_grad():
                lm.model.model.language_model(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                                              position_ids=inp.position_ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return acc


def _numpy_scales(x, w, n_rep, head_dim):
    """s per balance input column: SmoothQuant's max|X|^α / max|W|^(1-α), where query head h reads kv
    head h // n_rep (transformers' repeat_kv), so the n_rep columns of one kv channel share their max."""
    wcol = np.abs(w).max(axis=0)
    heads = len(x) // head_dim
    xs, ws = np.zeros(len(x)), np.zeros(len(x))
    for h in range(heads):
        kv = h // n_rep
        group = [g for g in range(heads) if g // n_rep == kv]
        for d in range(head_dim):
            xs[h * head_dim + d] = max(x[g * head_dim + d] for g in group)
            ws[h * head_dim + d] = max(wcol[g * head_dim + d] for g in group)
    return xs ** ALPHA / ws ** (1 - ALPHA)


def test_tiny_fixture_has_gqa(tiny_path, cctx):
    cfg = _load(tiny_path, cctx).model.config.text_config
    assert cfg.num_key_value_heads < cfg.num_attention_heads


def test_smoothing_is_exact_on_every_output(tiny_path, cctx, calib):
    from medlite.calibration.forward import ForwardLoop
    from medlite.compress.int8.smooth_extra import smooth_extra

    lm = _load(tiny_path, cctx)
    loop = ForwardLoop(lm, calib.samples, batch_size=8)
    before_w = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ref = _outputs(lm, loop)
    res = smooth_extra(lm.model, loop, mappings=BOTH, alphas={"decoder": ALPHA, "vision": ALPHA})
    n_dec = lm.model.config.text_config.num_hidden_layers
    n_vis = lm.model.config.vision_config.num_hidden_layers
    assert len(res.pairs) == 2 * n_dec + n_vis and res.observed == "own pass" and res.samples == len(calib.samples)
    changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, before_w[k])}
    assert any(k.endswith("layers.0.mlp.down_proj.weight") for k in changed)
    assert any(k.endswith("self_attn.out_proj.weight") for k in changed)
    # only the pairs' weights (and v_proj biases) moved: norms, gate/q/k and the projector did not
    assert all(any(p in k for p in ("v_proj", "o_proj", "out_proj", "up_proj", "down_proj")) for k in changed), changed
    got = _outputs(lm, loop)
    for a, b in zip(ref, got):
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-5


@pytest.mark.parametrize("graph", ["decoder", "vision"])
def test_balance_input_absmax_becomes_x_over_s(graph, tiny_path, cctx, calib):
    from medlite.calibration.forward import ForwardLoop
    from medlite.compress.int8.smooth_extra import smooth_extra

    lm = _load(tiny_path, cctx)
    loop = ForwardLoop(lm, calib.samples, batch_size=8)
    mods = dict(lm.model.named_modules())
    if graph == "decoder":
        pre = "model.language_model.layers.1."
        cfg = lm.model.config.text_config
        pairs = {pre + "self_attn.o_proj": (pre + "self_attn.v_proj", cfg.num_attention_heads // cfg.num_key_value_heads,
                                            cfg.hidden_size // cfg.num_attention_heads),
                 pre + "mlp.down_proj": (pre + "mlp.up_proj", 1, 1)}
    else:
        pre = "model.vision_tower.encoder.layers.1."
        cfg = lm.model.config.vision_config
        pairs = {pre + "self_attn.out_proj": (pre + "self_attn.v_proj", 1, cfg.hidden_size // cfg.num_attention_heads)}
    x0 = _balance_inputs(lm, loop, list(pairs))
    w0 = {n: mods[n].weight.detach().numpy().copy() for n in pairs}
    prev0 = {p: (mods[p].weight.detach().numpy().copy(), None if mods[p].bias is None else mods[p].bias.detach().numpy().copy())
             for p, _, _ in pairs.values()}
    smooth_extra(lm.model, loop, mappings=BOTH, alphas={graph: ALPHA})
    x1 = _balance_inputs(lm, loop, list(pairs))
    for name, (prev, n_rep, hd) in pairs.items():
        s = _numpy_scales(x0[name], w0[name], n_rep, hd)
        np.testing.assert_allclose(x1[name], x0[name] / s, rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(mods[name].weight.detach().numpy(), w0[name] * s[None, :], rtol=1e-5, atol=1e-7)
        s_prev = s.reshape(-1, n_rep, hd)[:, 0, :].reshape(-1) if n_rep > 1 else s   # one per kv channel
        w_prev, b_prev = prev0[prev]
        np.testing.assert_allclose(mods[prev].weight.detach().numpy(), w_prev / s_prev[:, None], rtol=1e-5, atol=1e-8)
        if b_prev is not None:
            np.testing.assert_allclose(mods[prev].bias.detach().numpy(), b_prev / s_prev, rtol=1e-5, atol=1e-8)
        assert not np.allclose(s, 1.0)


def test_statistics_observed_alongside_the_norm_smoothing_give_the_same_model(tiny_path, cctx, calib):
    """Riding along the norm SmoothQuant pass (no extra pass) smooths as a pass after it does: the
    balance inputs do not change under exact norm smoothing."""
    from medlite.calibration.forward import ForwardLoop
    from medlite.compress.int8.smooth_extra import smooth_extra
    from medlite.compress.int8.smoothquant import smooth_language_model

    a, b = _load(tiny_path, cctx), _load(tiny_path, cctx)
    la, lb = ForwardLoop(a, calib.samples, batch_size=8), ForwardLoop(b, calib.samples, batch_size=8)
    smooth_language_model(a.model, la, alpha=ALPHA)
    ra = smooth_extra(a.model, la, mappings=BOTH, alphas={"decoder": ALPHA})
    rb = smooth_extra(b.model, lb, mappings=BOTH, alphas={"decoder": ALPHA},
                      alongside=lambda: smooth_language_model(b.model, lb, alpha=ALPHA))
    assert ra.observed == "own pass" and rb.observed == "alongside SmoothQuant"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)




def test_option_default_canonical_order_and_bad_values_named(tmp_path):
    assert QuantizeOptions().smooth_extra == []
    p = tmp_path / "r.yaml"
    p.write_text(quantize_recipe(vision="int8", llm="w8a8", smooth_extra="[mlp_down, attn_out]"))
    assert load_recipe(p).recipe.stage("quantize").smooth_extra == ["attn_out", "mlp_down"]
    for bad, why in (("[fc2]", "attn_out"), ("[mlp_down, mlp_down]", "more than once")):
        p.write_text(quantize_recipe(vision="int8", llm="w8a8", smooth_extra=bad))
        with pytest.raises(RecipeError) as ei:
            load_recipe(p)
        assert any(e.startswith("stages[0].quantize.smooth_extra") and why in e for e in ei.value.errors), ei.value.errors


def test_stage_smooths_before_tracing_and_records_it(tiny_path, cctx, calib):
    import medlite.compress.int8.stage as stage

    lm = _load(tiny_path, cctx)
    state = int8_state(cctx, lm, calib)
    res = stage.apply_int8(state, 0, QuantizeOptions(vision="int8", llm="w8a8", vision_smoothquant_alpha=ALPHA,
                                                     smooth_extra=["mlp_down"], sensitivity=False))
    rec = res.manifest["smoothquant_no_norm_inputs"]
    n_dec = lm.model.config.text_config.num_hidden_layers
    assert rec["pairs"] == n_dec and rec["statistics_observed"] == "alongside SmoothQuant"
    assert rec["alphas"] == {"vision": ALPHA, "decoder": 0.5} and res.manifest["smoothquant"] is not None
    assert state.export_plan.graph("decoder").quantization["smooth_extra"] == ["mlp_down"]
