"""Torch-free views of the text and vision configs a checkpoint plan carries.

transformers 5.17 imports torch as soon as any of its config classes is imported (``configuration_utils``
→ ``generation``), which made ``medlite plan`` / ``medlite inspect`` take 5-7 s. A plan therefore holds
these small views of ``config.json`` fields; the transformers objects are made only when a model is
assembled (:meth:`TextSpec.to_transformers`, :meth:`VisionSpec.to_transformers`), exactly as before.

A view answers the handful of attributes planning and inspection read. Where a config omits one, the
default of the transformers 5.17 class is used (:data:`TEXT_DEFAULTS`, checked against the classes by
tests/checkpoints/test_header_inspect.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medlite.errors import CheckpointError

# Defaults of LlamaConfig / PhiConfig / StableLmConfig / Qwen2Config (transformers 5.17) for the fields
# medlite reads; num_key_value_heads None means "= num_attention_heads" (the classes' __post_init__).
_COMMON = {"num_key_value_heads": None, "tie_word_embeddings": False, "head_dim": None}
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048},
    "phi": {**_COMMON, "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 24, "num_attention_heads": 32, "max_position_embeddings": 2048},
    "stablelm": {**_COMMON, "vocab_size": 50304, "hidden_size": 2560, "intermediate_size": 6912,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "max_position_embeddings": 4096},
    "qwen2": {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 32768},
}
_REQUIRED_TEXT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "image_size",
                  "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
_REQUIRED_VISION = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")


def _int_field(name: str) -> property:
    """A read-only int property of a config view: the recorded value, else transformers' default."""
    return property(lambda self: int(self._get(name)), doc=f"``{name}`` (config.json, else the default)")


@dataclass
class TextSpec:
    """The text backbone's config.json fields (``fields``) for ``backbone``; ``where`` names the file."""

    backbone: str
    fields: dict
    where: str = "config.json"

    def _get(self, name: str):
        v = self.fields.get(name)
        return TEXT_DEFAULTS[self.backbone][name] if v is None else v

    @property
    def model_type(self) -> str:
        return self.backbone

    vocab_size = _int_field("vocab_size")
    hidden_size = _int_field("hidden_size")
    intermediate_size = _int_field("intermediate_size")
    num_hidden_layers = _int_field("num_hidden_layers")
    num_attention_heads = _int_field("num_attention_heads")
    max_position_embeddings = _int_field("max_position_embeddings")

    @property
    def num_key_value_heads(self) -> int:
        return int(self._get("num_key_value_heads") or self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(self._get("head_dim") or self.hidden_size // self.num_attention_heads)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self._get("tie_word_embeddings"))

    def to_transformers(self):
        """The transformers config (imports torch): :func:`medlite.checkpoints.textmodels.text_config_from_dict`."""
        from medlite.checkpoints.textmodels import text_config_from_dict

        return text_config_from_dict(self.fields, self.backbone, where=self.where)


def text_spec(d: dict, backbone: str, *, where: str = "config.json") -> TextSpec:
    """A :class:`TextSpec` of ``d`` (required fields checked here; the rest when the model is assembled)."""
    from medlite.checkpoints.textmodels import BACKBONES

    if backbone not in BACKBONES:
        raise CheckpointError(f"{where}: unsupported text backbone {backbone!r}; supported: {', '.join(BACKBONES)}")
    for req in _REQUIRED_TEXT:
        if req not in d:
            raise CheckpointError(f"{where}: text model field {req!r} missing")
    return TextSpec(backbone, dict(d), where)


@dataclass
class VisionSpec:
    """A SigLIP vision config with ``num_hidden_layers`` encoder layers (the ones used) and no pooling head."""

    fields: dict
    num_hidden_layers: int

    def __getattr__(self, name: str):
        fields = self.__dict__.get("fields") or {}
        if name in fields:
            return fields[name]
        if name == "num_channels":
            return 3
        raise AttributeError(name)

    def to_transformers(self):
        """The transformers ``SiglipVisionConfig`` (imports torch)."""
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(**self.fields, num_hidden_layers=self.num_hidden_layers, vision_use_head=False)


def vision_spec(vcfg: dict, *, layers: int) -> VisionSpec:
    """A :class:`VisionSpec` from a (released) vision config dict, keeping ``layers`` encoder layers."""
    keep = {k: v for k, v in vcfg.items() if k in _VISION_FIELDS}
    for req in _REQUIRED_VISION:
        if req not in keep:
            raise CheckpointError(f"vision config lacks {req!r}: {sorted(vcfg)}")
    return VisionSpec(keep, int(layers))
