"""The torch modules that are traced into ``vision.onnx``, ``embed.onnx`` and ``decoder.onnx``.

Each wraps parts of the canonical ``LlavaForConditionalGeneration`` so the traced graph has flat
tensor inputs and outputs, and the context managers below put the model in an export-friendly
state for the duration of the trace only (the caller's model is restored afterwards):

* :func:`export_attention` — explicit MatMul/Softmax attention with scores, mask and softmax in
  fp32 (:func:`fp32_softmax_attention`) instead of SDPA;
* :func:`decomposed_layer_norms` — every ``nn.LayerNorm`` becomes explicit
  ReduceMean/Sub/Mul/Sqrt/Div math computed in fp32. TensorRT 8.5 has no ``LayerNormalization``
  op (the TorchScript exporter emits it at opset 17), and in fp16 the variance overflows.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

# Additive mask value for blocked attention slots. Finite and representable in fp16, so a row whose
# every key is blocked (a left-padding query) gives a uniform softmax instead of NaN, which would
# otherwise leak into the cache; exp(-1e4 + s) is exactly 0 in fp32 and fp16 for any real score s.
MASK_VALUE = -1.0e4


class DecomposedLayerNorm(nn.Module):
    """``nn.LayerNorm`` as explicit math in fp32 (same result to float rounding), cast back at the end."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight = ln.weight
        self.bias = ln.bias
        self.eps = float(ln.eps)
        self.dims = tuple(range(-len(ln.normalized_shape), 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(dim=self.dims, keepdim=True)
        d = xf - mean
        var = (d * d).mean(dim=self.dims, keepdim=True)
        y = d / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


@contextlib.contextmanager
def decomposed_layer_norms(root: nn.Module) -> Iterator[int]:
    """Swap every ``nn.LayerNorm`` under ``root`` for :class:`DecomposedLayerNorm`; yields the count."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                swapped.append((parent, name, child))
                setattr(parent, name, DecomposedLayerNorm(child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


ATTENTION_NAME = "medlite_fp32_softmax"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, kv, s, d]`` → ``[b, kv * n_rep, s, d]`` (grouped-query attention), as transformers does it."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def fp32_softmax_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the scores, mask and softmax explicitly in fp32.

    transformers' eager path calls ``softmax(x, dtype=float32)``, which the TorchScript exporter
    turns into ``Cast(Softmax(x))``: the softmax itself would run in fp16 in the graph. Casting the
    scores first keeps it in fp32. For fp32 models this is the eager computation unchanged.
    """
    n_rep = int(getattr(module, "num_key_value_groups", 1))
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register_attention() -> None:
    # transformers dispatches attention by name through its own registry; registering the same
    # function under a fixed name is idempotent.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, fp32_softmax_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


@contextlib.contextmanager
def export_attention(model) -> Iterator[None]:
    """Use :func:`fp32_softmax_attention` in every (sub)config while tracing, then restore."""
    _register_attention()
    configs = [model.config, model.config.text_config, model.config.vision_config,
               model.model.language_model.config, model.model.vision_tower.config]
    seen, saved = set(), []
    for c in configs:
        if id(c) in seen:
            continue
        seen.add(id(c))
        saved.append((c, c._attn_implementation))
    try:
        for c, _ in saved:
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for c, value in reversed(saved):
            c._attn_implementation = value


class VisionGraph(nn.Module):
    """``pixel_values [batch,3,S,S]`` (fp32) → image embeddings ``[batch, n_img_tokens, hidden]``.

    Tower, feature-layer selection, token drop and projector, exactly as
    ``LlavaModel.get_image_features`` (re-written here only because that function returns a Python
    list per image, which a trace would unroll for a fixed batch size).
    """

    def __init__(self, model, dtype: torch.dtype):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True)
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return self.projector(feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1))


class EmbedGraph(nn.Module):
    """``input_ids [batch, seq]`` (int32) → token embeddings ``[batch, seq, hidden]`` (one Gather)."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.model.language_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def causal_slot_mask(attention_mask: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """``[batch, past+seq]`` 0/1 mask → additive ``[batch, 1, seq, past+seq]`` mask.

    Query ``i`` sits in slot ``past + i`` and may read slot ``j`` when ``j <= past + i`` and
    ``attention_mask[j] == 1``. Slot indices come from a float CumSum (TensorRT 8.5's Range/CumSum
    take no INT64), so no index tensors are created.
    """
    m = attention_mask.to(torch.float32)
    total = m.shape[1]
    slot = torch.cumsum(m * 0.0 + 1.0, dim=1) - 1.0                 # [batch, total]: 0..total-1
    q_slot = slot.narrow(1, total - seq, seq)                        # [batch, seq]
    allowed = (slot[:, None, None, :] <= q_slot[:, None, :, None]) & (m[:, None, None, :] > 0.5)
    return ((1.0 - allowed.to(torch.float32)) * MASK_VALUE).to(dtype)


class DecoderGraph(nn.Module):
    """Language model + ``lm_head`` with explicit KV-cache tensors (flat graph inputs/outputs).

    Inputs: ``inputs_embeds [b, s, h]``, ``attention_mask [b, past+s]`` (int32, 0 = blocked),
    ``position_ids [b, s]`` (int32), ``past_key_values.N.key/value [b, kv_heads, past, head_dim]``.
    Outputs: ``logits [b, s, vocab]`` (fp32), ``present.N.key/value [b, kv_heads, past+s, head_dim]``.
    ``past >= 1`` always: prefill passes one zero slot with mask 0 (see docs/export.md).
    """

    def __init__(self, model, num_layers: int, dtype: torch.dtype):
        super().__init__()
        self.lm = model.model.language_model
        self.head = model.lm_head
        self.num_layers = num_layers
        self.dtype = dtype

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        mask = causal_slot_mask(attention_mask, inputs_embeds.shape[1], self.dtype)
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True, return_dict=True)
        logits = self.head(out.last_hidden_state).float()
        present = []
        for layer in out.past_key_values.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)
