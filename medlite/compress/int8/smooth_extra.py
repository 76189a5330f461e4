"""Exact SmoothQuant for the INT8 matmul inputs that have no norm in front: o_proj's and down_proj's.

SmoothQuant (https://arxiv.org/abs/2211.10438) divides an activation's channel j by
``s_j = max|X_j|^α / max|W_j|^(1-α)`` and multiplies the next weight's input column j by ``s_j``.
:mod:`.smoothquant` folds ``1/s`` into the LayerNorm / RMSNorm in front of q/k/v and gate/up. Two
Q/DQ inputs of every layer have no norm in front, and can still be smoothed exactly by folding ``1/s``
into the *output rows* of an earlier linear layer:

* ``attn_out``: o_proj's input is the attention output ``softmax(QKᵀ)·V``, linear in each channel
  of V, so ``v_proj``'s output row (and bias) ``/ s`` and ``o_proj``'s input column ``· s`` is exact.
  With grouped-query attention query head ``h`` reads kv head ``h // n_rep`` (transformers'
  ``repeat_kv``), so ``s`` is defined per v_proj output channel (from the max over its ``n_rep``
  o_proj input channels, activations and weights alike) and repeated for o_proj's columns. The
  SigLIP tower's v_proj → out_proj is the same map without GQA.
* ``mlp_down``: down_proj's input is ``act(gate_proj(x)) · up_proj(x)``, elementwise in up_proj's
  output, so ``up_proj``'s output row ``/ s`` and ``down_proj``'s column ``· s`` is exact. (SigLIP's
  fc1 → fc2 has a GELU between them: not exact, not done; nor the projector's linear_1 → linear_2.)

Why not llm-compressor's ``SmoothQuantModifier`` with the mappings ``v_proj → o_proj`` and
``up_proj → down_proj`` (0.14, ``modifiers/transform/smoothquant/base.py``): it hooks the *smooth*
layer's output and takes its statistic there. For v_proj → o_proj that is V, not o_proj's input
(attention mixes tokens: the per-channel range of softmax·V is at most V's and in general smaller),
and with GQA v_proj's output is ``n_rep`` times narrower than o_proj's input, so its scale vector does
not fit o_proj's columns at all; for up_proj → down_proj it misses the act(gate) factor. Its AWQ
modifier hooks the balance layer's input (the right place) but skips v → o when the widths differ
(``_check_layers_are_compatible``: GQA) and searches scales for weight-only quantization loss, not
SmoothQuant's activation/weight balance. So the statistic here is observed with forward pre-hooks on
the balance layers (o_proj, down_proj, out_proj) — the very tensor that gets the Q/DQ node — through
the framework's forward loop (real image tokens; left-padding rows masked out, as the decoder's
calibration feeds never contain them).

The hooks can ride along the norm SmoothQuant passes (``alongside``): those passes smooth exactly, so
the balance layers' inputs are the same before and after them, and o_proj / down_proj weights are
not touched by norm smoothing — the extra pass over the calibration set (the costly part at full
size) is then saved.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

MAPPING_NAMES = ("attn_out", "mlp_down")
MIN_SCALE = 1e-5        # as llm-compressor's MINIMUM_SMOOTHING_SCALE
_DECODER_LAYER = re.compile(r"(?:^|\.)language_model\.layers\.\d+$")
_VISION_LAYER = re.compile(r"(?:^|\.)vision_tower\.encoder\.layers\.\d+$")


@dataclass(frozen=True)
class ExtraPair:
    """One exact smoothing pair: ``prev``'s output rows take 1/s, ``balance``'s input columns take s."""

    mapping: str        # attn_out | mlp_down
    graph: str          # decoder | vision
    prev: str           # module name (v_proj / up_proj)
    balance: str        # module name (o_proj / out_proj / down_proj)
    n_rep: int = 1      # balance input channels per prev output channel (GQA: heads // kv heads)
    head_dim: int = 0   # channels per head (attn_out), 0 = no head structure


@dataclass
class ExtraResult:
    """What the extra smoothing did (the quantize stage's manifest)."""

    alphas: dict
    mappings: list
    pairs: list = field(default_factory=list)      # ExtraPair
    samples: int = 0
    observed: str = ""                             # "alongside SmoothQuant" | "own pass"
    min_scale: float = 0.0
    max_scale: float = 0.0

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "mappings": list(self.mappings), "library": "medlite (see smooth_extra.py)",
                "pairs": len(self.pairs), "balance_layers": [p.balance for p in self.pairs],
                "samples": self.samples, "statistics_observed": self.observed,
                "scale_range": [round(self.min_scale, 6), round(self.max_scale, 6)]}


def _linear(mod, name: str):
    import torch

    m = getattr(mod, name, None)
    return m if isinstance(m, torch.nn.Linear) else None


def _attn_pair(prefix: str, layer, graph: str) -> Optional[ExtraPair]:
    attn = getattr(layer, "self_attn", None)
    v, o = _linear(attn, "v_proj"), _linear(attn, "o_proj" if graph == "decoder" else "out_proj")
    if v is None or o is None:
        return None
    n_rep = int(getattr(attn, "num_key_value_groups", 1) or 1)
    head_dim = int(getattr(attn, "head_dim", 0) or 0)
    if o.in_features != v.out_features * n_rep or not head_dim or v.out_features % head_dim:
        return None      # a layout this map does not know: leave it to the norm smoothing alone
    oname = "o_proj" if graph == "decoder" else "out_proj"
    return ExtraPair("attn_out", graph, f"{prefix}.self_attn.v_proj", f"{prefix}.self_attn.{oname}", n_rep, head_dim)


def _mlp_pair(prefix: str, layer) -> Optional[ExtraPair]:
    mlp = getattr(layer, "mlp", None)
    gate, up, down = (_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
    if gate is None or up is None or down is None or up.out_features != down.in_features:
        return None      # no gated MLP (e.g. fc1 → act → fc2): not an elementwise factor of down's input
    return ExtraPair("mlp_down", "decoder", f"{prefix}.mlp.up_proj", f"{prefix}.mlp.down_proj")


def find_pairs(model, mappings, graphs) -> list[ExtraPair]:
    """The exact pairs of ``model`` for ``mappings`` (names from :data:`MAPPING_NAMES`) in ``graphs``
    (``decoder`` / ``vision``); vision has only ``attn_out``."""
    unknown = sorted(set(mappings) - set(MAPPING_NAMES))
    if unknown:
        raise ValueError(f"unknown smoothing mapping(s) {unknown}; known: {list(MAPPING_NAMES)}")
    out = []
    for name, layer in model.named_modules():
        graph = "decoder" if _DECODER_LAYER.search(name) else "vision" if _VISION_LAYER.search(name) else None
        if graph not in graphs:
            continue
        if "attn_out" in mappings:
            out.append(_attn_pair(name, layer, graph))
        if "mlp_down" in mappings and graph == "decoder":
            out.append(_mlp_pair(name, layer))
    return [p for p in out if p is not None]


class BalanceObserver:
    """Per-channel absmax of each pair's balance-layer input, from forward pre-hooks.

    Decoder rows are masked with the language model's ``attention_mask`` of the running batch (a
    pre-hook on the language model records it), so left-padding positions — which no deployed prefill
    has — do not widen the statistic.
    """

    def __init__(self, model, pairs):
        self.model, self.pairs = model, list(pairs)
        self.absmax: dict = {}
        self._mask = [None]
        self._handles = []
        mods = dict(model.named_modules())
        lm = getattr(getattr(model, "model", None), "language_model", None)
        if lm is not None:
            self._handles.append(lm.register_forward_pre_hook(self._record_mask, with_kwargs=True))
        for p in self.pairs:
            self._handles.append(mods[p.balance].register_forward_pre_hook(self._hook(p)))

    def _record_mask(self, _mod, _args, kwargs):
        self._mask[0] = kwargs.get("attention_mask")

    def _hook(self, pair: ExtraPair):
        def pre(_mod, args):
            x = args[0].detach()
            mask = self._mask[0]
            if pair.graph == "decoder" and mask is not None and mask.dim() == 2 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            old = self.absmax.get(pair.balance)
            self.absmax[pair.balance] = m if old is None else old.maximum(m)
        return pre

    def missing(self) -> list:
        """Pairs whose balance layer has seen no input yet."""
        return [p for p in self.pairs if p.balance not in self.absmax]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _grouped(t, pair: ExtraPair):
    """A balance-input vector → per prev-output-channel max over its ``n_rep`` query heads."""
    if pair.n_rep == 1:
        return t
    return t.reshape(-1, pair.n_rep, pair.head_dim).amax(dim=1).reshape(-1)


def _expanded(s, pair: ExtraPair):
    """Per prev-output-channel scales → per balance input channel (kv head repeated ``n_rep`` times)."""
    if pair.n_rep == 1:
        return s
    kv = s.numel() // pair.head_dim
    return s.reshape(kv, 1, pair.head_dim).expand(kv, pair.n_rep, pair.head_dim).reshape(-1)


def pair_scales(pair: ExtraPair, x_absmax, w_balance, alpha: float):
    """SmoothQuant's ``s = max|X|^α / max|W|^(1-α)`` per prev-output channel (GQA-grouped); channels
    with no activation or no weight keep ``s = 1``. Returns (s per prev row, s per balance column)."""
    import torch

    x = _grouped(x_absmax.float(), pair)
    w = _grouped(w_balance.detach().abs().amax(dim=0).float(), pair)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((x > 0) & (w > 0), s, torch.ones_like(s)).clamp(min=MIN_SCALE)
    return s, _expanded(s, pair)


def _fold(model, pair: ExtraPair, x_absmax, alpha: float):
    import torch

    mods = dict(model.named_modules())
    prev, bal = mods[pair.prev], mods[pair.balance]
    s_prev, s_bal = pair_scales(pair, x_absmax, bal.weight, alpha)
    with torch.no_grad():
        prev.weight.div_(s_prev.to(prev.weight.dtype).view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s_prev.to(prev.bias.dtype))
        bal.weight.mul_(s_bal.to(bal.weight.dtype).view(1, -1))
    return s_prev


def smooth_extra(model, loop, *, mappings, alphas: dict, alongside: Optional[Callable[[], None]] = None,
                 ctx=None) -> ExtraResult:
    """Smooth ``mappings`` of ``model`` (HF Llava) in place, graph by graph at ``alphas[graph]``.

    Statistics come from ``alongside()`` (the norm SmoothQuant passes; see the module docstring) when
    it runs the balance layers, else from one :meth:`~medlite.calibration.forward.ForwardLoop.run`.
    """
    import torch

    pairs = find_pairs(model, mappings, [g for g, a in alphas.items() if a is not None])
    res = ExtraResult(alphas=dict(alphas), mappings=list(mappings), pairs=pairs)
    obs = BalanceObserver(model, pairs)
    try:
        if alongside is not None:
            alongside()
            res.observed = "alongside SmoothQuant"
        if obs.missing():
            loop.run(model, lm_head=False)
            res.observed = "own pass"
    finally:
        obs.remove()
    res.samples = len(loop)
    scales = [_fold(model, p, obs.absmax[p.balance], float(alphas[p.graph])) for p in pairs if p.balance in obs.absmax]
    if scales:
        allv = torch.cat(scales)
        res.min_scale, res.max_scale = float(allv.min()), float(allv.max())
    if ctx is not None:
        ctx.info(f"SmoothQuant (no-norm inputs {', '.join(mappings)}): {len(pairs)} layer pairs smoothed on "
                 f"{res.samples} calibration pairs, alpha {alphas} (channel factors {res.min_scale:.3g}..{res.max_scale:.3g})")
    return res


__all__ = ["BalanceObserver", "ExtraPair", "ExtraResult", "MAPPING_NAMES", "find_pairs", "pair_scales", "smooth_extra"]
