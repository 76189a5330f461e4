"""Text backbones: detection and transformers configs for llama / phi / stablelm / qwen2.

TinyLLaVA checkpoints store the language model's fields at the top level of ``config.json``
(legacy) or in a ``text_config`` dict (Factory, HF Llava). Either way the decoder is one of the
transformers architectures below, with the same parameter names as in transformers 5.17
(``model.layers.N.self_attn.q_proj``, Phi's ``dense`` / ``fc1`` / ``final_layernorm`` ...), so the
weights map one to one.
"""
from __future__ import annotations

import inspect
from typing import Iterable, Optional

from medlite.errors import CheckpointError

BACKBONES = ("llama", "phi", "stablelm", "qwen2")

# Fields that older configs use and transformers 5 converts itself (rope_theta → rope_parameters).
_LEGACY_FIELDS = {"rope_theta", "rope_scaling", "partial_rotary_factor"}
# StableLM "epoch" configs (TinyLLaVA-2.0B's remote code) name two fields differently.
_RENAMES = {"stablelm": {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}}
_DROP = {"model_type", "architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype",
         "dtype", "use_cache", "output_hidden_states", "return_dict", "id2label", "label2id"}


def _config_class(backbone: str):
    import transformers

    return {"llama": transformers.LlamaConfig, "phi": transformers.PhiConfig,
            "stablelm": transformers.StableLmConfig, "qwen2": transformers.Qwen2Config}[backbone]


def detect_backbone(model_type: str = "", architectures: Iterable[str] = (), keys: Iterable[str] = (),
                    *, where: str = "config.json") -> str:
    """Which decoder a checkpoint uses, from model_type, architectures, then tensor names."""
    hay = " ".join([model_type or "", *(architectures or [])]).lower()
    for needle, name in (("phi", "phi"), ("stablelm", "stablelm"), ("qwen", "qwen2"), ("llama", "llama"),
                         ("mistral", "llama")):
        if needle in hay:  # note "llava" does not contain "llama"
            return name
    keys = list(keys)
    if any(k.endswith("final_layernorm.weight") for k in keys) and any(".self_attn.dense." in k for k in keys):
        return "phi"
    if any(k.endswith("self_attn.q_proj.bias") for k in keys) and any(k.endswith("post_attention_layernorm.weight") for k in keys):
        return "qwen2"
    if any(k.endswith("input_layernorm.bias") for k in keys):
        return "stablelm"
    if any(k.endswith("mlp.gate_proj.weight") for k in keys):
        return "llama"
    raise CheckpointError(f"{where}: cannot tell the text backbone (model_type={model_type!r}, "
                          f"architectures={list(architectures or [])}); supported: {', '.join(BACKBONES)}")


def text_config_from_dict(d: dict, backbone: str, *, where: str = "config.json"):
    """A transformers config for ``backbone`` from a (possibly mixed legacy LLaVA) dict.

    Only fields the backbone config knows are passed on (plus old rope fields, which transformers
    converts), so LLaVA's ``mm_*`` entries do not leak into the text config.
    """
    if backbone not in BACKBONES:
        raise CheckpointError(f"{where}: unsupported text backbone {backbone!r}; supported: {', '.join(BACKBONES)}")
    cls = _config_class(backbone)
    known = set(inspect.signature(cls.__init__).parameters) | _LEGACY_FIELDS
    renames = _RENAMES.get(backbone, {})
    clean: dict = {}
    for k, v in d.items():
        k = renames.get(k, k)
        if k in known and k not in _DROP and k not in ("self", "kwargs"):
            clean[k] = v
    for req in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if req not in clean:
            raise CheckpointError(f"{where}: text model field {req!r} missing")
    try:
        return cls.from_dict(clean)
    except Exception as e:
        raise CheckpointError(f"{where}: invalid {backbone} text config ({type(e).__name__}: {e})") from None


def default_bos(backbone: str) -> bool:
    """Whether the backbone's tokenizer adds BOS by default (Llama: yes; GPT-2-style BPE: no)."""
    return backbone == "llama"


def llm_hub_id_for(backbone: str) -> Optional[str]:
    """A representative hub id written into Factory configs of random checkpoints (informational only)."""
    return {"llama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "phi": "microsoft/phi-2",
            "stablelm": "stabilityai/stablelm-2-zephyr-1_6b", "qwen2": "Qwen/Qwen2-0.5B"}.get(backbone)
