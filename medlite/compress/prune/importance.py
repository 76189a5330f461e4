"""Importance scores for structured pruning, measured on the medical calibration set through the whole VLM.

All passes go through the framework's forward loop (:class:`medlite.calibration.forward.ForwardLoop`),
so the decoder sees real image tokens spliced in exactly as at inference. Padding positions (the
loop left-pads) are excluded: the attention mask the loop passes to the language model is captured
by a forward pre-hook.

Definitions (Minitron-style activation norms, arXiv:2407.14679 §2.2; aggregated as an L2 norm over
every real token of every sample, accumulated in float64):

* MLP channel ``c`` of layer ``l``: ``sqrt(Σ_tokens a_c²)`` where ``a`` is the input of ``down_proj``
  (``act(gate(x)) * up(x)``).
* Attention head ``h`` of layer ``l``: ``sqrt(Σ_tokens Σ_{d∈head h} o_d²)`` where ``o`` is the input of
  ``o_proj`` (the concatenated per-head attention outputs). A KV group's score is the L2 norm over
  its query heads (``sqrt(Σ_{h∈group} score_h²)``): with GQA a KV head can only go with its group.
* Decoder layer ``l``: mean over real tokens of ``KL(p_full ‖ p_skip_l)``, the change of the
  next-token distribution when layer ``l`` is replaced by the identity (ShortGPT / Minitron depth).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

from medlite.errors import MedliteError


@dataclass
class DecoderParts:
    """Names of the prunable projections of a decoder layer (Llama / Qwen2 / Mistral naming)."""

    mlp_in: tuple = ("gate_proj", "up_proj")      # rows are intermediate channels
    mlp_out: str = "down_proj"                     # columns are intermediate channels
    q: str = "q_proj"
    kv: tuple = ("k_proj", "v_proj")
    o: str = "o_proj"


LLAMA = DecoderParts()


def decoder_layers(model):
    """The decoder layers of a canonical ``LlavaForConditionalGeneration``; a clear error when the
    language model is not Llama-style (separate q/k/v/o and gate/up/down projections)."""
    layers = model.model.language_model.layers
    first = layers[0]
    ok = all(hasattr(first.mlp, n) for n in LLAMA.mlp_in + (LLAMA.mlp_out,)) and \
        all(hasattr(first.self_attn, n) for n in (LLAMA.q, LLAMA.o) + LLAMA.kv)
    if not ok:
        raise MedliteError(f"prune supports Llama-style decoders (q/k/v/o_proj, gate/up/down_proj); this model's "
                           f"language model is {type(model.model.language_model).__name__}")
    return layers


def head_layout(text_config) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` of a decoder config."""
    nh = int(text_config.num_attention_heads)
    nkv = int(getattr(text_config, "num_key_value_heads", None) or nh)
    hd = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // nh)
    return nh, nkv, hd


@dataclass
class Importance:
    """Scores per decoder layer (float64 tensors on CPU) and how many samples/tokens produced them."""

    mlp: list = field(default_factory=list)        # [I] per layer
    heads: list = field(default_factory=list)      # [num_heads] per layer
    groups: list = field(default_factory=list)     # [num_kv_heads] per layer
    layers: Optional[object] = None                # [num_layers] skip-KL, when measured
    samples: int = 0
    tokens: int = 0


@contextlib.contextmanager
def _captured_mask(model, box: dict):
    """Keep the attention mask of the current language-model call in ``box["mask"]``."""
    def pre(_module, args, kwargs):
        box["mask"] = kwargs.get("attention_mask")

    handle = model.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _real(x, box: dict):
    """Rows of ``x [B, T, C]`` at real (non-padding) tokens, as ``[N, C]`` float64."""
    import torch

    mask = box.get("mask")
    x = x.detach().to(dtype=torch.float64)
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask.bool()]


def activation_importance(loop, model) -> Importance:
    """MLP-channel, head and KV-group scores of ``model`` over every sample of ``loop`` (see module doc)."""
    import torch

    layers = decoder_layers(model)
    nh, nkv, hd = head_layout(model.config.text_config)
    box: dict = {}
    sq_mlp = [None] * len(layers)
    sq_head = [None] * len(layers)
    handles = []

    def on_mlp(i):
        def hook(_m, args):
            a = _real(args[0], box)
            s = (a * a).sum(dim=0)
            sq_mlp[i] = s if sq_mlp[i] is None else sq_mlp[i] + s
        return hook

    def on_o(i):
        def hook(_m, args):
            a = _real(args[0], box)
            s = (a * a).sum(dim=0).view(-1, hd).sum(dim=1)
            sq_head[i] = s if sq_head[i] is None else sq_head[i] + s
        return hook

    tokens = [0]

    def count(_inp, _logits):
        tokens[0] += int(box["mask"].sum()) if box.get("mask") is not None else 0

    with _captured_mask(model, box):
        try:
            for i, layer in enumerate(layers):
                handles.append(getattr(layer.mlp, LLAMA.mlp_out).register_forward_pre_hook(on_mlp(i)))
                handles.append(getattr(layer.self_attn, LLAMA.o).register_forward_pre_hook(on_o(i)))
            n = loop.run(model, on_batch=count, lm_head=False)
        finally:
            for h in handles:
                h.remove()
    heads = [torch.sqrt(s) for s in sq_head]
    groups = [torch.sqrt(s.view(nkv, nh // nkv).sum(dim=1)) for s in sq_head]
    return Importance(mlp=[torch.sqrt(s) for s in sq_mlp], heads=heads, groups=groups, samples=n, tokens=tokens[0])


@contextlib.contextmanager
def skipped(layer):
    """Replace ``layer`` (a decoder layer returning its hidden states) by the identity."""
    def hook(_m, args, kwargs, _out):
        return args[0] if args else kwargs["hidden_states"]

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _kl_sum(logits_p, logits_q, mask) -> float:
    """Σ over real tokens of KL(softmax(p) ‖ softmax(q)), in float64."""
    import torch

    lp = torch.log_softmax(logits_p.double(), dim=-1)
    lq = torch.log_softmax(logits_q.double(), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(dim=-1)
    return float(kl[mask.bool()].sum())


def layer_importance(loop, model) -> tuple[object, int]:
    """Mean next-token KL when each decoder layer is skipped: ``([num_layers] float64, real tokens)``.

    For every batch of the loop the full model's logits come from the loop itself; the same batch
    is then run once per skipped layer (same inputs, same image embeddings).
    """
    import torch

    layers = decoder_layers(model)
    lm = model.model.language_model
    sums = [0.0] * len(layers)
    tokens = [0]

    def per_batch(inp, logits):
        mask = inp.attention_mask
        tokens[0] += int(mask.sum())
        for i, layer in enumerate(layers):
            with skipped(layer), torch.no_grad():
                out = lm(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                         position_ids=inp.position_ids, use_cache=False, return_dict=True)
                sums[i] += _kl_sum(logits, model.lm_head(out.last_hidden_state), mask)

    loop.run(model, on_batch=per_batch, lm_head=True)
    return torch.tensor(sums, dtype=torch.float64) / max(tokens[0], 1), tokens[0]


def keep_top(scores, k: int):
    """Indices of the ``k`` highest scores, in their original order (ties: the lower index wins)."""
    import torch

    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


__all__ = ["Importance", "activation_importance", "layer_importance", "keep_top", "decoder_layers",
           "head_layout", "skipped"]
