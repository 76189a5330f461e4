"""AWQ's clip search (medlite.compress.int4.awq_clip) against an independent numpy reference.

* :func:`best_clip` picks, per (row, group), the clip value a brute-force numpy search picks with its
  own int4 grid (compressed-tensors' formula written out here) and its own output error;
* on a tiny model, ``awq_clip`` clamps the AWQ-scaled weights and llm-compressor's scales and zero
  points are recomputed from the clamped weights (the records are the clipped quantizer's values);
  q_proj / k_proj are left alone, as AutoAWQ does.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch


def _args(symmetric: bool, group: int):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)


def _numpy_fake_quant(w: np.ndarray, symmetric: bool) -> np.ndarray:
    """One group's int4 fake quant, compressed-tensors' convention (levels -8..7, 0 always in range), in
    float32 like the quantizer: clamped weights sit at ±limit, i.e. at ±7.5 steps, where float32 rounding
    decides the level."""
    w = w.astype(np.float32)
    mn, mx = min(w.min(), np.float32(0)), max(w.max(), np.float32(0))
    if symmetric:
        scale, zp = np.float32(max(abs(mn), abs(mx)) / np.float32(7.5)), np.float32(0)
    else:
        scale = np.float32((mx - mn) / np.float32(15))
        zp = np.float32(np.clip(np.round(np.float32(-8) - mn / scale), -8, 7))
    scale = scale if scale > 0 else np.finfo(np.float32).eps
    return ((np.clip(np.round(w / scale + zp), -8, 7) - zp) * scale).astype(np.float64)


@pytest.mark.parametrize("symmetric", [False, True])
def test_best_clip_matches_a_numpy_search(symmetric):
    from medlite.compress.int4.awq_clip import best_clip

    rng = np.random.default_rng(0)
    rows, k, group, n_grid = 6, 64, 32, 20
    w = rng.standard_normal((rows, k)).astype(np.float32)
    w[:, 3] *= 6            # an outlier column: clipping it should pay off in some groups
    x = rng.standard_normal((300, k)).astype(np.float32)
    got = best_clip(torch.from_numpy(w), torch.from_numpy(x), _args(symmetric, group), n_grid=n_grid).numpy()
    for r in range(rows):
        for g in range(k // group):
            wg, xg = w[r, g * group:(g + 1) * group].astype(np.float64), x[:, g * group:(g + 1) * group]
            absmax = np.abs(wg).max()
            lims = absmax * (1 - np.arange(n_grid // 2) / n_grid)
            errs = np.array([np.mean((xg @ (_numpy_fake_quant(np.clip(wg, -lim, lim), symmetric) - wg)) ** 2)
                             for lim in lims])
            pick = int(np.argmin(np.abs(lims - got[r, g])))
            assert abs(lims[pick] - got[r, g]) <= 1e-5 * absmax, "not one of the candidates"
            # the least error (float32 vs float64 may swap near-ties, nothing more)
            assert errs[pick] <= errs.min() * (1 + 1e-4), (r, g, errs[pick], errs.min())
    assert (got < np.abs(w).reshape(rows, -1, group).max(-1) * (1 - 1e-6)).any(), "nothing was clipped"


def test_awq_clip_clamps_weights_and_requantizes(cctx, tiny_path, calib):
    from unittest import mock

    import medlite.compress.int4.awq_clip as awq_clip
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model

    loaded = load_model(tiny_path, ctx=cctx)
    loop = ForwardLoop(loaded, calib.samples[:8], batch_size=4)
    seen, changes = {}, []
    original = awq_clip.clip_layer

    def spy(layer, *a, **k):
        before = {n: m.weight.detach().clone() for n, m in layer.named_modules() if hasattr(m, "weight_scale")}
        shrink = original(layer, *a, **k)
        changes.extend((n, w, layer.get_submodule(n).weight.detach().clone(), shrink.get(n)) for n, w in before.items())
        return shrink

    def capture(model):
        for name, m in model.named_modules():
            if hasattr(m, "weight_scale"):
                seen[name.removesuffix(".inner")] = (m.weight.detach().double().clone(),
                                                     m.weight_scale.detach().double().clone(),
                                                     m.weight_zero_point.detach().double().clone())

    opts = LlmcOptions("awq", 32, symmetric=False, awq_clip=True)
    with mock.patch.object(awq_clip, "clip_layer", spy):
        records = quantize_language_model(loaded.model, loop, opts, on_quantized=capture)
    clipped_groups = 0
    for name, before, after, shrink in changes:
        if name.endswith(("q_proj", "k_proj")):     # AutoAWQ leaves q/k alone
            assert shrink is None and torch.equal(before, after), name
            continue
        b, a = before.view(before.shape[0], -1, 32), after.view(after.shape[0], -1, 32)
        lim = a.abs().amax(-1, keepdim=True)
        torch.testing.assert_close(a, torch.clamp(b, -lim, lim))       # a clamp of the scaled weights, nothing else
        clipped_groups += int((lim < b.abs().amax(-1, keepdim=True) * (1 - 1e-6)).sum())
        assert shrink is not None and 0.5 <= shrink <= 1.0
    assert changes and clipped_groups > 0
    for name, (w, s, z) in seen.items():
        g = w.view(w.shape[0], -1, 32)
        mn, mx = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        # llm-compressor's scales and zero points are those of the clamped weights the module holds
        torch.testing.assert_close(s, (mx - mn) / 15, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(z, torch.clamp(torch.round(-8 - mn.float() / s.float()), -8, 7).double())
        np.testing.assert_allclose(records[name].scales.numpy(), s.numpy(), rtol=1e-6)
