"""SmoothQuant on the language model with llm-compressor 0.14, calibrated by the framework's forward loop.

Why llm-compressor's :class:`SmoothQuantModifier` and not our own: it is the maintained
implementation of the algorithm (https://arxiv.org/abs/2211.10438, ``s_j = max|X_j|^α /
max|W_j|^(1-α)``, folded into the preceding RMSNorm and the following projections). Why not
``oneshot``: its pipelines feed text-only ``input_ids`` through a Hugging Face processor, so the
language model of a VLM would be calibrated without the image tokens that are ~90 % of a
TinyLLaVA-Med prompt. The modifier itself only needs forward passes while its hooks are on, so we
drive it through its public lifecycle (``initialize`` → ``CALIBRATION_START`` event → forwards →
``SEQUENTIAL_EPOCH_END`` (smooth) → ``CALIBRATION_END`` → ``finalize``) around
:meth:`medlite.calibration.forward.ForwardLoop.run`.

Scope: llm-compressor's default Llama mappings (``re:.*input_layernorm`` etc.) also match SigLIP
layers of a Llava model ("must match a single smooth layer"); the mappings here are anchored on
``language_model.layers.N`` so only the decoder is touched. The smoothing is exact in real
arithmetic (the model's fp32 outputs change by rounding only; tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# (balance layers, smooth layer) per decoder layer: the two mappings of llm-compressor's
# DEFAULT_SMOOTHQUANT_MAPPINGS, anchored on the language model.
_LM = r"re:.*language_model\.layers\.\d+\."
MAPPINGS = [
    [[_LM + r"self_attn\.q_proj$", _LM + r"self_attn\.k_proj$", _LM + r"self_attn\.v_proj$"],
     _LM + r"input_layernorm$"],
    [[_LM + r"mlp\.gate_proj$", _LM + r"mlp\.up_proj$"], _LM + r"post_attention_layernorm$"],
]

# SigLIP encoder layers: LayerNorm (with bias) → q/k/v and → fc1; the projector has no norm in front.
_VT = r"re:.*vision_tower\.encoder\.layers\.\d+\."
VISION_MAPPINGS = [
    [[_VT + r"self_attn\.q_proj$", _VT + r"self_attn\.k_proj$", _VT + r"self_attn\.v_proj$"], _VT + r"layer_norm1$"],
    [[_VT + r"mlp\.fc1$"], _VT + r"layer_norm2$"],
]


@dataclass
class SmoothResult:
    """What smoothing did: alpha, how many norms were smoothed and the largest migration factor."""

    alpha: float
    smoothed: list = field(default_factory=list)     # smooth-layer module names
    samples: int = 0                                  # calibration pairs (decoder) or distinct images (vision)
    unit: str = "pairs"
    max_scale: float = 0.0
    min_scale: float = 0.0
    factors: dict = field(default_factory=dict, repr=False)     # smooth layer → per-channel s (torch)
    balance: dict = field(default_factory=dict, repr=False)     # smooth layer → balance module names

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "library": "llmcompressor.modifiers.transform.SmoothQuantModifier",
                "smoothed_norms": len(self.smoothed), "samples": self.samples, "samples_are": self.unit,
                "scale_range": [round(self.min_scale, 6), round(self.max_scale, 6)]}


def _norm_weights(model, names, attr: str = "weight") -> dict:
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        t = getattr(mods[n], attr, None)
        out[n] = t.detach().clone() if t is not None else None
    return out


def smooth_language_model(model, loop, *, alpha: float, ctx=None, observer=None) -> SmoothResult:
    """Apply SmoothQuant (migration strength ``alpha``) to ``model``'s language model in place.

    ``model`` is the HF ``LlavaForConditionalGeneration``; ``loop`` a
    :class:`~medlite.calibration.forward.ForwardLoop` whose batches carry real image tokens.
    """
    return smooth_model(model, loop, alpha=alpha, mappings=MAPPINGS, what="decoder", ctx=ctx, observer=observer)


def smooth_vision_tower(model, loop, *, alpha: float, ctx=None, observer=None) -> SmoothResult:
    """SmoothQuant on the SigLIP encoder layers (LayerNorm → q/k/v, LayerNorm → fc1), in place.

    The hooks see the calibration images encoded by the working model, each distinct image once and
    without the language model (:meth:`~medlite.calibration.forward.ForwardLoop.run_images`: the
    per-channel absmax SmoothQuant takes is the same, at full size ~4x less compute per pair).
    """
    return smooth_model(model, loop, alpha=alpha, mappings=VISION_MAPPINGS, what="vision", ctx=ctx, observer=observer)


def smooth_model(model, loop, *, alpha: float, mappings, what: str, ctx=None, observer=None) -> SmoothResult:
    """SmoothQuant with ``mappings`` ([balance layers], smooth layer) driven by ``loop``'s forwards.

    ``observer`` (a context manager, e.g. :class:`~medlite.compress.int8.forward_ranges.AbsMaxObserver`)
    is active during that same pass, so other statistics need no pass of their own; the result's
    ``factors`` and ``balance`` say how each balance module's input was scaled.
    """
    import contextlib

    import torch

    from medlite.compress.int8.forward_ranges import smoothing_factors
    from llmcompressor.core import Event, EventType, State
    from llmcompressor.core.state import Data
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    mod = SmoothQuantModifier(smoothing_strength=float(alpha), mappings=mappings)
    state = State(model=model)
    state.data = Data(calib=loop)      # the modifier only checks that calibration data exists
    mod.initialize(state)
    names = [m.smooth_name for m in mod.resolved_mappings_]
    if not names:
        raise ValueError(f"SmoothQuant matched no {what} layer norm")
    to_name = {id(m): k for k, m in model.named_modules()}
    balance = {m.smooth_name: [to_name[id(b)] for b in m.balance_layers] for m in mod.resolved_mappings_}
    before, bias_before = _norm_weights(model, names), _norm_weights(model, names, "bias")
    mod.update_event(state, Event(type_=EventType.CALIBRATION_START))
    try:
        with observer if observer is not None else contextlib.nullcontext():
            n = loop.run_images(model) if what == "vision" else loop.run(model, lm_head=_runs_head(observer),
                                                                          on_batch=_trim)
        mod.update_event(state, Event(type_=EventType.SEQUENTIAL_EPOCH_END))
    finally:
        mod.update_event(state, Event(type_=EventType.CALIBRATION_END))
        mod.finalize(state)
    after = _norm_weights(model, names)
    # the migration factor of each channel is the ratio of the norm's weights before/after
    ratios = torch.cat([(before[k] / after[k]).flatten() for k in names if before[k].shape == after[k].shape])
    res = SmoothResult(alpha=float(alpha), smoothed=names, samples=n, unit="images" if what == "vision" else "pairs",
                       max_scale=float(ratios.max()), min_scale=float(ratios.min()),
                       factors=smoothing_factors(before, after, bias_before, _norm_weights(model, names, "bias")),
                       balance=balance)
    if ctx is not None:
        ctx.info(f"SmoothQuant ({what}) alpha {alpha}: {len(names)} norms smoothed on {n} calibration "
                 f"{'images' if what == 'vision' else 'pairs'} "
                 f"(channel factors {res.min_scale:.3g}..{res.max_scale:.3g})")
    return res


def _trim(inputs, logits) -> None:
    """After each batch: hand freed heap pages back to the OS. Batches of different prompt lengths leave
    freed activation chunks glibc keeps mapped — the full-size 128-pair SmoothQuant pass sat at
    11.6 GB (heap 6.7 GB, of which ~3.5 GB free) over a 6.1 GB model (benchmarks/int8_full_size.py)."""
    from medlite.memory import trim_heap

    trim_heap()


def _runs_head(observer) -> bool:
    """Whether the pass must run lm_head (only when an observer watches its input)."""
    return observer is not None and any(n == "lm_head" or n.endswith(".lm_head") for n in getattr(observer, "names", ()))


__all__ = ["MAPPINGS", "SmoothResult", "VISION_MAPPINGS", "smooth_language_model", "smooth_model",
           "smooth_vision_tower"]
