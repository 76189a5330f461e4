"""The INT8 stage's smoothing passes: SmoothQuant on the norms (llm-compressor), the no-norm inputs
(:mod:`.smooth_extra`), and — riding along the same forward passes — the min-max range observation
(:mod:`.forward_ranges`)."""
from __future__ import annotations


FORWARD_BYTES = 1 << 30    # transient activations of one torch forward batch (see forward_rows)
PROMPT_TEXT_TOKENS = 64    # template + question tokens of a prompt


def forward_rows(model, graph: str, *, cap: int = 8, budget: int = FORWARD_BYTES) -> int:
    """Rows per torch forward batch of a calibration pass, so one layer's transient activations (eager
    attention scores + probabilities, the MLP's intermediate tensors; fp32) stay under ``budget``.

    Full size: a decoder row of ~790 positions holds ≈ 0.2 GB in one layer (32 heads × 790² scores
    twice, 3 × 5632-wide MLP tensors), so 8 rows added ~1.7 GB on top of the 6 GB model during
    SmoothQuant (benchmarks/int8_full_size.py); the demo model stays at ``cap`` (its rows are KB).
    """
    cfg = model.config.vision_config if graph == "vision" else model.config.text_config
    if graph == "vision":
        tokens = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
    else:
        vc = model.config.vision_config
        tokens = (int(vc.image_size) // int(vc.patch_size)) ** 2 + PROMPT_TEXT_TOKENS
    attn = 2 * int(cfg.num_attention_heads) * tokens * tokens
    mlp = 3 * tokens * int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
    per_row = 4 * (attn + mlp + 4 * tokens * int(cfg.hidden_size))
    return int(max(1, min(cap, budget // per_row)))


def smooth_for_int8(state, opts, graphs: list, samples: list, fr=None):
    """SmoothQuant before tracing: the norms in front of q/k/v and gate/up (llm-compressor,
    :mod:`.smoothquant`), then with ``smooth_extra`` the no-norm inputs of o_proj / down_proj
    (:mod:`.smooth_extra`, statistics observed alongside the first, then folded after it, so the norm
    smoothing is the same with or without). With ``fr`` (:class:`.forward_ranges.ForwardRanges`) the same
    passes observe the min-max ranges of every graph (a graph without SmoothQuant gets a pass of its
    own). Returns (decoder, vision, extra) results or None."""
    ctx, model = state.ctx, state.model.model
    out = {"decoder": None, "vision": None}

    def norms():
        if "vision" in graphs and opts.vision_smoothquant_alpha is not None:
            from medlite.compress.int8.smoothquant import smooth_vision_tower

            loop = state.forward_loop(samples=samples, description="smoothquant vision",
                                      batch_size=forward_rows(model, "vision"))
            out["vision"] = smooth_vision_tower(model, loop,
                                                alpha=opts.vision_smoothquant_alpha, ctx=ctx, observer=fr and fr.observer("vision"))
            if fr is not None:
                fr.smoothed("vision", out["vision"], out["vision"].samples)
        if "decoder" in graphs and opts.smoothquant_alpha is not None:
            from medlite.compress.int8.smoothquant import smooth_language_model

            loop = state.forward_loop(samples=samples, description="smoothquant", equal_length=fr is not None,
                                      batch_size=forward_rows(model, "decoder"))
            out["decoder"] = smooth_language_model(model, loop, alpha=opts.smoothquant_alpha, ctx=ctx,
                                                   observer=fr and fr.observer("decoder"))
            if fr is not None:
                fr.smoothed("decoder", out["decoder"], out["decoder"].samples)
        for g in [g for g in graphs if fr is not None and g not in fr.absmax]:   # no SmoothQuant pass to ride
            fr.observe_only(g, model, state.forward_loop(samples=samples, description=f"int8 {g} ranges", equal_length=True,
                                                         batch_size=forward_rows(model, g)))

    if not opts.smooth_extra:
        norms()
        return out["decoder"], out["vision"], None
    from medlite.compress.int8.smooth_extra import find_pairs, smooth_extra

    # the extra smoothing runs at each graph's SmoothQuant alpha; a graph without SmoothQuant gets none
    alphas = {"decoder": opts.smoothquant_alpha, "vision": opts.vision_smoothquant_alpha}
    alphas = {g: a for g, a in alphas.items() if g in graphs}
    for g in [g for g, a in alphas.items() if a is None]:
        ctx.warn(f"int8 {g}: smooth_extra {opts.smooth_extra} skipped: the graph's SmoothQuant alpha is null")
    probe = None
    if fr is not None:     # the extra factors go into balance columns: read them back to divide the ranges
        from medlite.compress.int8.forward_ranges import ColumnProbe

        pairs = find_pairs(model, opts.smooth_extra, [g for g, a in alphas.items() if a is not None])
        probe = ColumnProbe(model, [p.balance for p in pairs])
    extra = smooth_extra(model, state.forward_loop(samples=samples, description="smoothquant (no-norm inputs)"),
                         mappings=opts.smooth_extra, alphas=alphas, alongside=norms, ctx=ctx)
    if probe is not None:
        fr.divide(probe.factors(model))
    return out["decoder"], out["vision"], extra


__all__ = ["FORWARD_BYTES", "forward_rows", "smooth_for_int8"]
