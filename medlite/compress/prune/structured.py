"""Structured pruning surgery: smaller dense ``nn.Linear`` modules and an updated config.

The pruned model is the same ``LlavaForConditionalGeneration`` class with a consistent config
(``intermediate_size``, ``num_attention_heads`` / ``num_key_value_heads`` / explicit ``head_dim``,
``num_hidden_layers``, vision ``num_hidden_layers`` / ``vision_feature_layer``), so
``save_pretrained`` → ``from_pretrained`` in plain transformers rebuilds exactly these shapes.
Hugging Face configs have one size per decoder (not per layer): every layer keeps the same number
of channels and groups, each layer choosing its own by its own scores.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from medlite.compress.prune.importance import LLAMA, decoder_layers, head_layout
from medlite.errors import MedliteError


def _rows(idx, width: int):
    """Row indices of whole blocks ``idx`` of ``width`` rows each."""
    import torch

    return (idx.view(-1, 1) * width + torch.arange(width).view(1, -1)).reshape(-1)


def sliced_linear(linear, *, rows=None, cols=None):
    """A new ``nn.Linear`` holding ``linear``'s weight at ``rows`` (outputs) / ``cols`` (inputs)."""
    import torch

    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    bias = linear.bias
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias.detach() if rows is None else bias.detach().index_select(0, rows))
    new.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
    return new


def _text_configs(model) -> list:
    """The text config objects to update (the top-level one and the language model's, if distinct)."""
    a, b = model.config.text_config, model.model.language_model.config
    return [a] if a is b else [a, b]


def prune_mlp(model, keep: Sequence) -> int:
    """Keep MLP intermediate channels ``keep[l]`` (sorted LongTensors, all the same length) of every layer."""
    layers = decoder_layers(model)
    sizes = {int(k.numel()) for k in keep}
    if len(keep) != len(layers) or len(sizes) != 1:
        raise ValueError(f"need one equal-length channel list per layer, got sizes {sorted(sizes)}")
    for layer, idx in zip(layers, keep):
        mlp = layer.mlp
        for name in LLAMA.mlp_in:
            setattr(mlp, name, sliced_linear(getattr(mlp, name), rows=idx))
        setattr(mlp, LLAMA.mlp_out, sliced_linear(getattr(mlp, LLAMA.mlp_out), cols=idx))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = int(idx.numel())
    size = sizes.pop()
    for cfg in _text_configs(model):
        cfg.intermediate_size = size
    return size


def prune_kv_groups(model, keep: Sequence) -> tuple[int, int]:
    """Keep KV groups ``keep[l]`` of every layer, each with its query heads (GQA).

    Returns the new ``(num_attention_heads, num_key_value_heads)``. ``head_dim`` is written into the
    config explicitly: ``hidden_size // num_attention_heads`` no longer gives it.
    """
    layers = decoder_layers(model)
    nh, nkv, hd = head_layout(model.config.text_config)
    per_group = nh // nkv
    sizes = {int(k.numel()) for k in keep}
    if len(keep) != len(layers) or len(sizes) != 1:
        raise ValueError(f"need one equal-length group list per layer, got sizes {sorted(sizes)}")
    for layer, groups in zip(layers, keep):
        attn = layer.self_attn
        heads = _rows(groups, per_group)                  # query heads of the kept groups
        q_rows, kv_rows = _rows(heads, hd), _rows(groups, hd)
        setattr(attn, LLAMA.q, sliced_linear(getattr(attn, LLAMA.q), rows=q_rows))
        for name in LLAMA.kv:
            setattr(attn, name, sliced_linear(getattr(attn, name), rows=kv_rows))
        setattr(attn, LLAMA.o, sliced_linear(getattr(attn, LLAMA.o), cols=q_rows))
    g = sizes.pop()
    for cfg in _text_configs(model):
        cfg.num_key_value_heads = g
        cfg.num_attention_heads = g * per_group
        cfg.head_dim = hd
    return g * per_group, g


def drop_decoder_layers(model, keep: Sequence[int]) -> int:
    """Keep decoder layers ``keep`` (indices, in order); KV-cache layer indices are renumbered."""
    import torch

    lm = model.model.language_model
    keep = sorted(int(i) for i in keep)
    if not keep:
        raise MedliteError("pruning would remove every decoder layer")
    lm.layers = torch.nn.ModuleList([lm.layers[i] for i in keep])
    for new_idx, layer in enumerate(lm.layers):
        layer.self_attn.layer_idx = new_idx
    for cfg in _text_configs(model):
        cfg.num_hidden_layers = len(keep)
        types = getattr(cfg, "layer_types", None)
        if types:
            cfg.layer_types = [types[i] for i in keep]
    return len(keep)


def _absolute_feature_layer(fl: int, n_layers: int) -> int:
    # hidden_states[0] is the patch embedding, hidden_states[i] the output of encoder layer i.
    return fl if fl >= 0 else n_layers + 1 + fl


def drop_vision_layers(model, n: int, *, warn: Optional[Callable[[str], None]] = None) -> dict:
    """Remove the top ``n`` SigLIP encoder layers; the projector reads the same layer when it survives,
    else the new top layer (then the image features change: ``warn`` says so)."""
    import torch

    vcfg = model.config.vision_config
    fl = model.config.vision_feature_layer
    if not isinstance(fl, int):
        raise MedliteError(f"vision_layers pruning needs a single vision_feature_layer, this model has {fl!r}")
    tower = model.model.vision_tower
    enc = getattr(tower, "vision_model", tower).encoder     # transformers 5 dropped the vision_model level
    total = len(enc.layers)
    if n >= total:
        raise MedliteError(f"vision_layers {n}: the vision tower has {total} layers, at least one must stay")
    wanted = _absolute_feature_layer(fl, total)
    left = total - n
    enc.layers = torch.nn.ModuleList(list(enc.layers)[:left])
    vcfg.num_hidden_layers = left
    if getattr(model.model.vision_tower, "config", None) is not vcfg:
        model.model.vision_tower.config.num_hidden_layers = left
    unchanged = wanted <= left
    new_fl = (wanted - left - 1) if (unchanged and fl < 0) else (wanted if unchanged else -1)
    model.config.vision_feature_layer = new_fl
    if not unchanged and warn is not None:
        warn(f"prune: vision feature layer {fl} was removed; the projector now reads encoder layer {left} "
             f"(image features change — distill afterwards)")
    return {"layers_before": total, "layers_after": left, "feature_layer_before": fl, "feature_layer_after": new_fl,
            "features_unchanged": bool(unchanged)}


__all__ = ["prune_mlp", "prune_kv_groups", "drop_decoder_layers", "drop_vision_layers", "sliced_linear"]
