"""``medlite plan``: what a recipe will do and write, with estimated sizes, without running it.

Parameter counts come from safetensors headers (a few kB read, even for a 3 GB checkpoint); other
checkpoints (PyTorch ``.bin``, vision weights outside the folder) are loaded to count them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "w8a8": 1, "int4": 0.5}
# Tensor-name fragments → component, checked in order (legacy, TinyLLaVA Factory and HF names).
_RULES = (
    ("vision", ("vision_tower", "vision_model")),
    ("projector", ("mm_projector", "multi_modal_projector", "connector")),
    ("embed", ("embed_tokens", "wte.")),
    ("lm_head", ("lm_head",)),
)


@dataclass
class ComponentSizes:
    """Parameters per component of the source model and how they were counted."""

    params: dict[str, int]
    method: str                       # "safetensors headers" | "loaded model"
    kv: dict = field(default_factory=dict)   # num_layers, num_kv_heads, head_dim (when known)


def classify(name: str) -> str:
    """Which component a checkpoint tensor belongs to (vision, projector, embed, lm_head, llm)."""
    for comp, frags in _RULES:
        if any(f in name for f in frags):
            return comp
    return "llm"


def sizes_from_headers(folder: Path) -> Optional[ComponentSizes]:
    """Count parameters from safetensors headers; None when that is not possible."""
    from medlite.checkpoints.pool import read_safetensors_header, weight_files

    files = weight_files(folder)
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    params = {"vision": 0, "projector": 0, "embed": 0, "lm_head": 0, "llm": 0}
    for f in files:
        for name, (_dtype, shape) in read_safetensors_header(f).items():
            if ".head." in name and "vision" in name:
                continue          # SigLIP's pooling head: the VLM never runs it
            n = 1
            for d in shape:
                n *= d
            params[classify(name)] += n
    if params["vision"] == 0:
        return None               # the tower lives outside the checkpoint (legacy mm_vision_tower)
    if params["lm_head"] == 0:
        params["lm_head"] = params["embed"]   # tied: the decoder graph still carries the head
    return ComponentSizes(params=params, method="safetensors headers", kv=_kv_from_config(folder))


def _kv_from_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    text = cfg.get("text_config") or cfg.get("llm_config") or cfg
    try:
        heads = int(text["num_attention_heads"])
        return {"num_layers": int(text["num_hidden_layers"]),
                "num_kv_heads": int(text.get("num_key_value_heads") or heads),
                "head_dim": int(text.get("head_dim") or int(text["hidden_size"]) // heads)}
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return {}


def sizes_from_model(loaded) -> ComponentSizes:
    """Count parameters on a loaded model."""
    m = loaded.model
    emb = m.model.language_model.get_input_embeddings().weight.numel()
    bd = loaded.param_breakdown()
    tc = m.config.text_config
    heads = tc.num_attention_heads
    kv = {"num_layers": tc.num_hidden_layers, "num_kv_heads": getattr(tc, "num_key_value_heads", None) or heads,
          "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // heads}
    return ComponentSizes(params={"vision": bd["vision_tower"]["params"], "projector": bd["projector"]["params"],
                                  "embed": emb, "lm_head": m.lm_head.weight.numel(), "llm": bd["llm"]["params"]},
                          method="loaded model", kv=kv)


def estimate_files(sizes: ComponentSizes, precision: str, components: list[str]) -> dict[str, int]:
    """Estimated bytes of each exported graph at ``precision``."""
    b = BYTES[precision]
    p = sizes.params
    est = {"vision": ("vision.onnx", p["vision"] + p["projector"]),
           "embed": ("embed.onnx", p["embed"]),
           "decoder": ("decoder.onnx", p["llm"] + p["lm_head"])}
    return {est[c][0]: int(est[c][1] * b) for c in components}


def kv_cache_bytes(kv: dict, tokens: int, batch: int = 1, bytes_per: float = 2) -> Optional[int]:
    """Keys + values of every layer for ``tokens`` positions (None when the config is unknown)."""
    if not kv:
        return None
    return int(2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * tokens * batch * bytes_per)
