"""LoRA adapter folders: ``adapter_config.json`` checks and tensor-name bookkeeping (no torch here).

Naming is the crux of merging an adapter into medlite's canonical model: peft saves tensors under
the module names of the model it wrapped *during training* (``base_model.model.`` + the training
model's names), i.e. in the base checkpoint's **source** naming — ``model.layers.0.self_attn.q_proj``
for a legacy TinyLLaVA base, ``language_model.model.layers.0...`` for a TinyLLaVA Factory one. This
module splits those keys into (module, LoRA part), normalises ``non_lora_trainables.bin`` keys the
way LLaVA's / TinyLLaVA's ``load_pretrained_model`` does, and maps source names to canonical names
with the base plan's own prefix rules (so adapter and base go through the same key map).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from medlite.errors import CheckpointError

PEFT_PREFIX = "base_model.model."
# tensors a peft LoRA layer owns, as peft's ``get_peft_model_state_dict`` names them (adapter name removed)
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
              "lora_magnitude_vector")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>" + "|".join(re.escape(p) for p in LORA_PARTS) + r")$")

# adapter_config.json fields that are passed on to the canonical LoraConfig (they change the merge)
PASSED = ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")
# fields that only mattered for training / for choosing modules (the weights say which modules exist)
HARMLESS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "lora_dropout", "init_lora_weights", "layers_to_transform", "layers_pattern", "target_modules",
            "exclude_modules", "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "megatron_core",
            "runtime_config", "peft_version", "ensure_weight_tying", "eva_config", "corda_config", "loftq_config",
            "qalora_group_size", "lora_ga_config"}
# initialisations that rewrite the *base* weights (the adapter is then relative to a modified base)
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` as a dict (clear errors for a missing or malformed file)."""
    f = folder / "adapter_config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no adapter_config.json — not a peft adapter folder") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return cfg


def _is_default(value, default) -> bool:
    if value == default:
        return True
    return value in (None, False, [], {}, "")


def check_lora_options(cfg: dict, where: str) -> tuple[dict, list[str]]:
    """Validate a LoRA ``adapter_config.json``; return (options passed to the canonical LoraConfig, notes).

    Only plain LoRA (optionally DoRA, rsLoRA, LoRA bias) merges into a base model as a weight update.
    Every other option must be unset: options this peft does not know are refused unless they hold
    a default-like value, because an unknown option could change what the merge means.
    """
    import dataclasses

    from peft import LoraConfig

    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported — only LORA adapters "
                              f"(including DoRA, use_dora: true) can be merged into the base weights")
    notes = []
    if "peft_type" not in cfg:
        notes.append("adapter_config.json has no peft_type; LORA assumed")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise CheckpointError(
            f"{where}: init_lora_weights={init!r} modifies the base weights at initialisation, so this adapter is "
            f"relative to a modified base, not to the base checkpoint. Save it with peft's "
            f"path_initial_model_for_weight_conversion (which turns it into a plain LoRA adapter) first.")
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{where}: bias={bias!r} unknown (none | all | lora_only)")
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(LoraConfig)}
    bad = []
    for key, value in cfg.items():
        if key in PASSED or key in HARMLESS:
            continue
        if not _is_default(value, defaults.get(key)):
            known = "" if key in defaults else " (unknown to this peft version)"
            bad.append(f"{key}={value!r}{known}")
    if bad:
        raise CheckpointError(f"{where}: LoRA option(s) medlite cannot merge: {', '.join(bad)} — only plain LoRA, "
                              f"DoRA (use_dora), rsLoRA (use_rslora) and lora_bias merge into the base weights")
    passed = {k: cfg[k] for k in PASSED if k in cfg and cfg[k] is not None}
    for k in ("r", "lora_alpha"):
        if k in passed and (not isinstance(passed[k], (int, float)) or passed[k] <= 0):
            raise CheckpointError(f"{where}: {k}={passed[k]!r} must be a positive number")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(k) or {}, dict):
            raise CheckpointError(f"{where}: {k} must be an object (module pattern → value)")
    return passed, notes


def split_lora_key(key: str) -> Optional[tuple[str, str]]:
    """``"m.q_proj.lora_A.weight"`` → ``("m.q_proj", "lora_A.weight")``; None for a full tensor."""
    m = _LORA_KEY.match(key)
    return (m.group("module"), m.group("part")) if m else None


def strip_peft_prefix(keys: list[str], label: str) -> dict[str, str]:
    """Adapter tensor names without ``base_model.model.`` → original names (all must carry it)."""
    bad = [k for k in keys if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise CheckpointError(f"{label}: tensor name(s) without the peft prefix {PEFT_PREFIX!r}: "
                              f"{', '.join(sorted(bad)[:8])}" + (" …" if len(bad) > 8 else ""))
    return {k[len(PEFT_PREFIX):]: k for k in keys}


def full_tensor_name(name: str) -> str:
    """A full tensor an adapter carries, as the base names it.

    peft saves targeted embedding layers (``save_embedding_layers``) as ``<module>.base_layer.weight``;
    that is the module's own weight, which ``PeftModel.from_pretrained`` loads over the base's.
    """
    return name.replace(".base_layer.", ".")


def normalise_non_lora(keys: list[str]) -> dict[str, str]:
    """LLaVA / TinyLLaVA ``load_pretrained_model`` key normalisation: new name → file key.

    ``base_model.`` (11 characters) is stripped where present; then, if any key starts with
    ``model.model.``, ``model.`` is stripped from every key that starts with it.
    """
    step1 = {(k[len("base_model."):] if k.startswith("base_model.") else k): k for k in keys}
    if any(k.startswith("model.model.") for k in step1):
        step1 = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in step1.items()}
    if len(step1) != len(keys):
        raise CheckpointError("non_lora_trainables.bin: two keys collapse to the same name after LLaVA's "
                              "prefix normalisation")
    return step1


class NameMap:
    """Source tensor name → canonical tensor name, using the base plan's prefix rules.

    The candidates are the plan's ``(canonical prefix, pool, source prefix)`` rules plus the format's
    full-checkpoint key map (so a LoRA on the checkpoint's vision tower maps even when the plan reads the
    tower from a ``--vision-tower`` copy) and, for HF Llava bases, transformers' current module names
    (an adapter trained with transformers ≥ 4.52 names modules ``model.language_model.*`` even when the
    base file stores ``language_model.model.*``). The longest matching source prefix wins.
    """

    def __init__(self, plan):
        from medlite.checkpoints.writers import KEYMAP

        pairs = [(c, s) for c, _pool, s in plan.rules] + list(KEYMAP.get(plan.fmt, []))
        if plan.fmt == "hf":
            pairs += [(c, c) for c in ("model.language_model.", "model.multi_modal_projector.", "model.vision_tower.",
                                       "lm_head.")]
        self.pairs = sorted(set(pairs), key=lambda cs: -len(cs[1]))

    def canonical(self, source_name: str) -> Optional[str]:
        for c, s in self.pairs:
            if source_name.startswith(s):
                return c + source_name[len(s):]
        return None

    def canonical_module(self, source_module: str) -> Optional[str]:
        c = self.canonical(source_module + ".")
        return None if c is None else c[:-1]
