"""AWQ's weight clipping (AutoAWQ's ``auto_clip``), which llm-compressor 0.14's AWQModifier lacks.

AWQ as its authors ship it (AutoAWQ ``apply_clip=True``, the paper's "clip" step) has two parts:
per-channel scales, then a per-group clipping search on the *scaled* layer, measured by the error of
the layer's output on real calibration inputs. llm-compressor 0.14 implements only the scales
(``llmcompressor/modifiers/transform/awq/base.py``: no clip step; its closest tool, the
``imatrix_mse`` weight observer, weighs weight error by E[x²] per input channel, a diagonal
approximation that was measured worse here — docs/quantization-int4.md).

For each group of each output row, :func:`best_clip` tries shrinking the group's absolute maximum
by ``1 - i / n_grid`` (``i < max_shrink · n_grid``), clamps the weights to ± that value, quantizes
them on the module's own compressed-tensors grid (``calculate_qparams`` + ``fake_quantize``: the
quantizer's exact rounding) and keeps the value with the least mean squared output error
``E_t[(x_t,g · (Q(w_g) - w_g))²]`` over sampled real tokens. :func:`clip_layer` then clamps the
weights in place and has llm-compressor recompute the scales and zero points from them, so the
records read afterwards are the clipped quantizer's own integers.

As in AutoAWQ, ``q_proj`` / ``k_proj`` are not clipped (their outputs meet in ``q·kᵀ``, so a
per-layer output error is a poor proxy for them).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

SKIP = ("q_proj", "k_proj")      # AutoAWQ's auto_clip_block skips these too
N_GRID = 20                      # AutoAWQ's defaults: 20 steps, shrink the range by at most 50 %
MAX_SHRINK = 0.5
MAX_TOKENS = 2048                # real tokens sampled per layer input (AutoAWQ: 512 from 128 × 512)
ROW_CHUNK = 256                  # output rows searched at a time (bounds the [tokens, rows, groups] error)


def _quantized_linears(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in layer.named_modules()
            if isinstance(m, nn.Linear) and getattr(m, "quantization_scheme", None) is not None
            and not any(part in SKIP for part in n.split("."))]


@contextlib.contextmanager
def sampled_inputs(targets: list[tuple[str, nn.Module]], masks: list, state, max_tokens: int = MAX_TOKENS):
    """Collect each target's real (unpadded) input rows while the layer runs; yields ``{name: [rows]}``.

    ``state.current_batch_idx`` says which batch (and so which attention mask) is running. Each batch
    keeps at most its share of ``max_tokens`` rows (evenly strided), so memory stays bounded at full
    size (128 pairs × ~840 tokens of down_proj's 5,632-wide input would be 2.4 GB)."""
    seen: dict[str, list] = {n: [] for n, _ in targets}
    per_batch = max(1, -(-max_tokens // max(1, len(masks))))

    def hook_for(name):
        def hook(_m, args):
            x = args[0].detach()
            mask = masks[state.current_batch_idx].to(torch.bool)
            seen[name].append(_subsample([x[mask].reshape(-1, x.shape[-1]).float()], per_batch))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in targets]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _subsample(rows: list, limit: int) -> torch.Tensor:
    x = torch.cat(rows)
    if x.shape[0] > limit:      # evenly strided, deterministic (AutoAWQ strides too)
        x = x[torch.linspace(0, x.shape[0] - 1, limit).round().long()]
    return x


def _fake_quant(w: torch.Tensor, args) -> torch.Tensor:
    """Group min/max → the module's compressed-tensors qparams → its fake-quant weights."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = w.shape
    g = w.view(n, k // args.group_size, args.group_size)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    return fake_quantize(w, scale, zp, args)


@torch.no_grad()
def best_clip(w: torch.Tensor, x: torch.Tensor, args, n_grid: int = N_GRID,
              max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """Per (row, group) absolute clip value of ``w [N, K]`` minimizing the output error on ``x [T, K]``."""
    n, k = w.shape
    gs = args.group_size
    xg = x.view(x.shape[0], k // gs, gs)
    out = torch.empty(n, k // gs)
    for r0 in range(0, n, ROW_CHUNK):
        wc = w[r0:r0 + ROW_CHUNK].float()
        wg = wc.view(wc.shape[0], -1, gs)                                       # [rows, G, gs]
        absmax = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full(absmax.shape[:2], float("inf"))
        best = absmax.squeeze(-1).clone()
        for i in range(int(max_shrink * n_grid)):
            lim = absmax * (1 - i / n_grid)
            cur = torch.clamp(wg, -lim, lim)
            diff = (_fake_quant(cur.reshape_as(wc), args) - wc).view_as(wg)
            err = torch.einsum("tgk,rgk->trg", xg, diff).pow(2).mean(0)        # [rows, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, lim.squeeze(-1), best)
        out[r0:r0 + ROW_CHUNK] = best
    return out


@torch.no_grad()
def clip_layer(layer: nn.Module, run_layer, masks: list, state, max_tokens: int = MAX_TOKENS) -> dict:
    """Clip the AWQ-scaled quantized Linears of one decoder layer in place; return the mean shrink per name.

    ``run_layer()`` runs the layer over the calibration batches (setting ``state.current_batch_idx``)
    with llm-compressor's hooks off, so the captured inputs are those the scaled weights see."""
    from llmcompressor.modifiers.quantization.calibration import observe, update_qparams

    targets = _quantized_linears(layer)
    if not targets:
        return {}
    with sampled_inputs(targets, masks, state, max_tokens) as seen:
        run_layer()
    shrink = {}
    for name, m in targets:
        args = m.quantization_scheme.weights   # K is a multiple of the group (padded layers: their ``.inner``)
        lim = best_clip(m.weight.data, _subsample(seen.pop(name), max_tokens), args)
        absmax = m.weight.data.view(m.out_features, -1, args.group_size).abs().amax(-1).float()
        shrink[name] = float((lim / absmax.clamp_min(1e-12)).mean())
        full = lim.repeat_interleave(args.group_size, dim=1).to(m.weight.dtype)
        m.weight.data = torch.clamp(m.weight.data, -full, full)
        obs = getattr(m, "weight_observer", None)
        if obs is not None and hasattr(obs, "delete_statistics"):
            obs.delete_statistics(check_fused=False)
        observe([m], "weight")
        update_qparams([m], "weight")
    return shrink


__all__ = ["MAX_TOKENS", "N_GRID", "best_clip", "clip_layer", "sampled_inputs"]
