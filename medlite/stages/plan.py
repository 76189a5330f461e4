"""``medlite plan``: what a recipe will do and write, with estimated sizes, without running it.

Parameter counts come from ``medlite.checkpoints.inspect_checkpoint``, which assembles the model on
the ``meta`` device from headers (no tensor data read, so a 3 GB checkpoint plans in seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "w8a8": 1, "int4": 0.5}


@dataclass
class ComponentSizes:
    """Parameters per component of the source model and how they were counted."""

    params: dict[str, int]
    method: str
    kv: dict = field(default_factory=dict)   # num_layers, num_kv_heads, head_dim
    tied: bool = False                        # lm_head shares the embedding table


def sizes_from_model(loaded) -> ComponentSizes:
    """Count parameters on a loaded (or meta-device inspected) model."""
    m = loaded.model
    emb_w = m.model.language_model.get_input_embeddings().weight
    emb, tied = emb_w.numel(), m.lm_head.weight is emb_w
    bd = loaded.param_breakdown()
    tc = m.config.text_config
    heads = tc.num_attention_heads
    kv = {"num_layers": tc.num_hidden_layers, "num_kv_heads": getattr(tc, "num_key_value_heads", None) or heads,
          "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // heads}
    return ComponentSizes(params={"vision": bd["vision_tower"]["params"], "projector": bd["projector"]["params"],
                                  "embed": emb, "lm_head": 0 if tied else m.lm_head.weight.numel(),
                                  "llm": bd["llm"]["params"]},
                          method="checkpoint headers", kv=kv, tied=tied)


def estimate_files(sizes: ComponentSizes, precision: str, components: list[str]) -> dict[str, int]:
    """Estimated bytes of each exported file at ``precision``.

    The token embedding table is stored once in ``embed_tokens.bin`` (read by the embed graph and,
    when tied, by the decoder's head); large graphs put their weights in ``<graph>.onnx.data``.
    """
    b = BYTES[precision]
    p = sizes.params
    out = {}
    if "vision" in components:
        out["vision.onnx"] = int((p["vision"] + p["projector"]) * b)
    if "embed" in components or ("decoder" in components and sizes.tied):
        out["embed_tokens.bin"] = int(p["embed"] * b)
    if "embed" in components:
        out["embed.onnx"] = 1024      # a Gather node; the table is the file above
    if "decoder" in components:
        out["decoder.onnx"] = int((p["llm"] + p["lm_head"]) * b)
    return out


def human_bytes(n: float) -> str:
    """``1.23 GB`` / ``45.6 MB`` / ``7.8 kB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def kv_cache_bytes(kv: dict, tokens: int, batch: int = 1, bytes_per: float = 2) -> Optional[int]:
    """Keys + values of every layer for ``tokens`` positions (None when the config is unknown)."""
    if not kv:
        return None
    return int(2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * tokens * batch * bytes_per)
