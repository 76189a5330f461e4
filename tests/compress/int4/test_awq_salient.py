"""AWQ does what it is for — protect salient input channels — through medlite's loop and export.

The demo model has almost no activation outliers (docs/quantization-int4.md, "There is little for AWQ
to protect"), so on it AWQ lands within noise of round-to-nearest and its gate in
``test_int4_demo_model.py`` is not robust. Trained LLMs do have such channels (TinyLlama among them).
Here they are planted in a tiny random model without changing its function: for a few channels ``j``
of each RMSNorm that feeds quantized layers, ``norm.weight[j] *= C`` and column ``j`` of every consumer
is divided by ``C``. The fp32 forward is unchanged (checked), but channel ``j`` now carries activations
``C``× the others' while its weights are ``C``× smaller, so round-to-nearest on a group shared with
ordinary weights rounds them away and the error is multiplied by the large activation: the case AWQ's
activation-aware scales exist for.

Independent references: round-to-nearest is written here in torch (asymmetric min-max groups of 32 on
the int4 grid [0, 15] — the grid of compressed-tensors' and onnxruntime's asymmetric int4); the fp32
model is the unquantized copy. AWQ's logits come from the exported MatMulNBits decoder on ONNX Runtime,
so the norm weights AWQ rescaled must have reached the graph too.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from int4_decoder import export_decoder, ort_logits

from medlite.compress.int4.llmc import language_linear_names

C = 32.0                 # how much larger the planted channels' activations are
SALIENT = (5, 40)        # planted channels of the hidden width (64)
GROUP = 32


def _consumers(layer):
    a, m = layer.self_attn, layer.mlp
    return ((layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
            (layer.post_attention_layernorm, (m.gate_proj, m.up_proj)))


def _plant_salient_channels(model) -> None:
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for norm, linears in _consumers(layer):
                norm.weight[list(SALIENT)] *= C
                for lin in linears:
                    lin.weight[:, list(SALIENT)] /= C


def _rtn_asym(w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Round-to-nearest, asymmetric int4 groups along the input dimension (independent of any library)."""
    out, k = w.shape
    g = w.reshape(out, k // group, group)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zp = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zp, 0, 15)
    return ((q - zp) * scale).reshape(out, k)


def _logits(model, probe) -> np.ndarray:
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=probe.inputs_embeds, attention_mask=probe.attention_mask,
                                         position_ids=probe.position_ids)
        return model.lm_head(out.last_hidden_state).numpy()


def _rel_err(got: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Relative squared error of the logits over the real (unpadded) positions."""
    return float(((got[mask] - ref[mask]) ** 2).sum() / (ref[mask] ** 2).sum())


@pytest.fixture(scope="module")
def planted(cctx, tiny_path, calib):
    """(the planted model's holder, the unplanted model, calibration loop, held-out probe batch)."""
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model

    loaded = load_model(tiny_path, ctx=cctx)
    loop = ForwardLoop(loaded, calib.samples[:8], batch_size=4)
    probe = loop.batch(calib.samples[8:14])          # never seen by the quantizer
    original = copy.deepcopy(loaded.model)
    _plant_salient_channels(loaded.model)
    return SimpleNamespace(loaded=loaded, original=original, loop=loop, probe=probe,
                           mask=probe.attention_mask.bool().numpy())


def _rtn_error(model, probe, mask) -> float:
    rtn = copy.deepcopy(model)
    with torch.no_grad():
        for name in language_linear_names(rtn, lm_head=False):
            lin = rtn.get_submodule(name)
            lin.weight.copy_(_rtn_asym(lin.weight))
    return _rel_err(_logits(rtn, probe), _logits(model, probe), mask)


def test_planting_keeps_the_function(planted):
    before, after = _logits(planted.original, planted.probe), _logits(planted.loaded.model, planted.probe)
    assert np.abs(after - before)[planted.mask].max() <= 1e-4 * np.abs(before[planted.mask]).max()


def test_awq_protects_salient_channels_round_to_nearest_does_not(planted, tmp_path):
    """Measured (2026-12-03): relative logit error, round-to-nearest 0.100 unplanted → 0.322 planted;
    AWQ on the planted model 0.091 (it removes all the planted damage); GPTQ 0.153 for comparison."""
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model

    p = planted
    reference = _logits(p.loaded.model, p.probe)
    rtn_plain, rtn_planted = _rtn_error(p.original, p.probe, p.mask), _rtn_error(p.loaded.model, p.probe, p.mask)
    assert rtn_planted > 2 * rtn_plain, (rtn_planted, rtn_plain)     # the planted channels do hurt RTN

    awq = SimpleNamespace(model=copy.deepcopy(p.loaded.model))
    records = quantize_language_model(awq.model, p.loop, LlmcOptions("awq", GROUP, symmetric=False))
    _, path = export_decoder(awq, records, tmp_path)
    awq_err = _rel_err(ort_logits(path, awq, p.probe), reference, p.mask)

    with torch.no_grad():
        shrink = [float((mine.input_layernorm.weight[list(SALIENT)] / theirs.input_layernorm.weight[list(SALIENT)]).max())
                  for mine, theirs in zip(awq.model.model.language_model.layers, p.loaded.model.model.language_model.layers)]
    # AWQ found the planted channels from activations alone: it folded 1/s into their norm weights
    assert max(shrink) < 0.5, shrink
    # end to end (ONNX Runtime, MatMulNBits): AWQ undoes >= 90 % of the damage round-to-nearest takes
    assert awq_err <= rtn_plain + 0.1 * (rtn_planted - rtn_plain), (awq_err, rtn_plain, rtn_planted)
    assert awq_err <= 0.4 * rtn_planted, (awq_err, rtn_planted)
