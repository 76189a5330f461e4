"""The peft half of a LoRA merge: adapter modules checked against the canonical model, injected, merged.

:mod:`medlite.checkpoints.lora` prepares an adapter (names mapped, full tensors planned) and assembles
the base; this module checks every LoRA module's tensors against the canonical layer it targets,
builds the canonical ``LoraConfig`` (the adapter's options with canonical module names and per-module
rank / alpha), and lets peft inject, load (``set_peft_model_state_dict``) and ``merge_and_unload``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medlite.checkpoints.lora_keys import PEFT_PREFIX, NameMap
from medlite.checkpoints.pool import TensorPool, _list_preview
from medlite.errors import CheckpointError

_EMBED = "model.language_model.embed_tokens"


@dataclass
class FullTensor:
    """A full tensor from the adapter folder that replaces one base tensor."""

    canonical: str
    pool: TensorPool
    key: str


@dataclass
class Prepared:
    """An adapter folder read and mapped onto its base's plan (before the base is assembled)."""

    adapter_dir: Path
    base_dir: Path
    base_from: str
    cfg: dict
    options: dict
    plan: object
    names: NameMap
    weights: Path                           # adapter_model.safetensors | .bin
    pool: TensorPool                        # its tensors
    lora: dict[str, dict[str, str]]         # source module -> {part: file key}
    full: list[FullTensor]
    nl_pool: Optional[TensorPool]
    notes: list[str] = field(default_factory=list)


def dropped_by_base(prep: Prepared, canonical: str) -> Optional[str]:
    """The reason the base plan discarded the tensor behind ``canonical`` (None: it did not)."""
    ref = prep.plan.source_of(canonical)
    if ref is None or ref[1] not in ref[0]:
        return None
    reason = ref[0].consumed.get(ref[1])
    return reason if reason not in (None, "used") and not reason.startswith("replaced by") else None


@dataclass
class LoraModule:
    """One LoRA-adapted layer: its training (source) name, canonical name and module, tensors, rank, alpha."""

    source: str
    canonical: str
    module: object
    parts: dict[str, str]
    r: int
    alpha: float
    grow: int = 0       # rows the canonical lm_head / embedding has beyond the source (image token)


def check_modules(prep: Prepared, model) -> list[LoraModule]:
    """Map every LoRA module to the canonical model and check its tensors' shapes against the base layer."""
    import torch.nn as nn
    from peft.utils.other import get_pattern_key

    modules = dict(model.named_modules())
    pool, cfg = prep.pool, prep.cfg
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    lacking, out = [], []
    for src, parts in sorted(prep.lora.items()):
        cm = prep.names.canonical_module(src)
        mod = modules.get(cm) if cm else None
        if mod is None:
            dropped = dropped_by_base(prep, cm + ".weight") if cm else None
            if dropped:
                # e.g. a LoRA on a vision layer past the selected feature layer: it never runs in the source
                pool.discard(parts.values(), f"LoRA on a module the base conversion drops ({dropped})")
                continue
            lacking.append(f"{src} (canonical {cm})" if cm else src)
            continue
        label = f"{pool.label}: LoRA on {src}"
        if isinstance(mod, nn.Linear):
            need, a_key, b_key = ("lora_A.weight", "lora_B.weight"), "lora_A.weight", "lora_B.weight"
            n_in, n_out = mod.in_features, mod.out_features
        elif isinstance(mod, nn.Embedding):
            need, a_key, b_key = ("lora_embedding_A", "lora_embedding_B"), "lora_embedding_A", "lora_embedding_B"
            n_in, n_out = mod.num_embeddings, mod.embedding_dim
        else:
            raise CheckpointError(f"{label}: the base module {cm} is a {type(mod).__name__}; only Linear and "
                                  f"Embedding LoRA layers are supported")
        missing = [p for p in need if p not in parts]
        extra = [p for p in parts if p not in need + ("lora_magnitude_vector", "lora_B.bias")]
        if missing or extra:
            raise CheckpointError(f"{label}: " + (f"missing {', '.join(missing)}" if missing else "") +
                                  (f"{'; ' if missing else ''}{', '.join(extra)} do not fit a "
                                   f"{type(mod).__name__}" if extra else ""))
        if "lora_magnitude_vector" in parts and not prep.options.get("use_dora"):
            raise CheckpointError(f"{label}: has lora_magnitude_vector but adapter_config.json has no use_dora: true")
        if "lora_B.bias" in parts and not prep.options.get("lora_bias"):
            raise CheckpointError(f"{label}: has lora_B.bias but adapter_config.json has no lora_bias: true")
        a_shape, b_shape = tuple(pool.shape(parts[a_key])), tuple(pool.shape(parts[b_key]))
        r = a_shape[0]
        grow = 0
        if cm in ("lm_head", _EMBED):
            if tied:
                raise CheckpointError(f"{label}: the base ties lm_head to the input embeddings; a LoRA on one of "
                                      f"them cannot be merged without changing the other")
            src_rows = prep.plan.source_of(cm + ".weight")
            src_rows = src_rows[0].shape(src_rows[1])[0]
            grow = (n_out if cm == "lm_head" else n_in) - src_rows
            if grow and "lora_magnitude_vector" in parts:
                raise CheckpointError(f"{label}: DoRA on {cm} cannot be merged — medlite appends an image-token row "
                                      f"to it, and DoRA's per-row norm of a zero row is undefined")
        want_in, want_out = (n_in - grow, n_out) if cm == _EMBED else (n_in, n_out - grow)
        if isinstance(mod, nn.Linear):
            if len(a_shape) != 2 or a_shape[1] != want_in:
                raise CheckpointError(f"{label}: {parts[a_key]} has shape {a_shape}: its in-features "
                                      f"{a_shape[1:]} ≠ the base layer's {want_in} ({cm})")
            if b_shape != (want_out, r):
                raise CheckpointError(f"{label}: {parts[b_key]} has shape {b_shape}, the base layer {cm} needs "
                                      f"({want_out}, {r}) (out-features {want_out}, rank {r})")
        elif a_shape[1:] != (want_in,) or b_shape != (want_out, r):
            raise CheckpointError(f"{label}: {parts[a_key]} {a_shape} / {parts[b_key]} {b_shape} do not fit the base "
                                  f"embedding {cm} ({want_in} rows × {want_out})")
        for p, want in (("lora_magnitude_vector", (want_out,)), ("lora_B.bias", (want_out,))):
            if p in parts and tuple(pool.shape(parts[p])) != want:
                raise CheckpointError(f"{label}: {parts[p]} has shape {tuple(pool.shape(parts[p]))}, expected {want}")
        # peft's own rule for per-module rank / alpha, applied to the *training* (source) module name
        cfg_r = rank_pat.get(get_pattern_key(rank_pat.keys(), src), r0)
        if cfg_r != r:
            raise CheckpointError(f"{label}: adapter_config.json gives rank {cfg_r} but {parts[a_key]} has rank {r}")
        alpha = alpha_pat.get(get_pattern_key(alpha_pat.keys(), src), a0)
        out.append(LoraModule(src, cm, mod, parts, r, alpha, grow))
    if lacking:
        raise CheckpointError(f"{pool.label}: the adapter targets module(s) the base {prep.plan.path} "
                              f"({prep.plan.fmt}) lacks: {_list_preview(lacking, 12)}")
    return out


def lora_config(prep: Prepared, mods: list[LoraModule]):
    """The canonical LoraConfig: the adapter's options, with the mapped (canonical) module names."""
    import re

    from peft import LoraConfig

    r0 = prep.cfg.get("r", 8)
    a0 = prep.cfg.get("lora_alpha", 8)
    # exact per-module patterns (escaped: peft treats pattern keys as regular expressions)
    rank = {re.escape(m.canonical): m.r for m in mods if m.r != r0}
    alpha = {re.escape(m.canonical): m.alpha for m in mods if m.alpha != a0}
    opts = {k: v for k, v in prep.options.items() if k not in ("r", "lora_alpha")}
    return LoraConfig(r=r0, lora_alpha=a0, target_modules=sorted(m.canonical for m in mods), rank_pattern=rank,
                      alpha_pattern=alpha, bias="none", lora_dropout=0.0, inference_mode=True, **opts)


def merge_lora(prep: Prepared, model, mods: list[LoraModule]):
    """Inject with peft, load the renamed adapter weights, check nothing is left out, merge_and_unload."""
    import warnings

    import torch
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = {}
    for m in mods:
        for part, key in m.parts.items():
            t = prep.pool.take(key).to(torch.float32)
            if m.grow and part in ("lora_B.weight", "lora_B.bias", "lora_embedding_A"):
                # the appended image-token row gets no update: zero rows/columns keep it as assembled
                dim = 1 if part == "lora_embedding_A" else 0
                pad_shape = list(t.shape)
                pad_shape[dim] = m.grow
                t = torch.cat([t, torch.zeros(pad_shape, dtype=t.dtype)], dim=dim)
            state[f"{PEFT_PREFIX}{m.canonical}.{part}"] = t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on task_type / tied weights are about training
        peft_model = get_peft_model(model, lora_config(prep, mods))
        result = set_peft_model_state_dict(peft_model, state)
    # the LoRA tensors peft expects (saved embedding base layers are full tensors, applied by assembly)
    expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False).keys())
    unexpected = sorted(set(result.unexpected_keys) | (set(state) - expected))
    unloaded = sorted(expected - set(state))
    if unexpected or unloaded:
        raise CheckpointError(f"{prep.pool.label}: peft did not take the adapter as mapped — "
                              + (f"not loaded: {_list_preview(unloaded, 8)}; " if unloaded else "")
                              + (f"unexpected: {_list_preview(unexpected, 8)}" if unexpected else ""))
    merged = peft_model.merge_and_unload(safe_merge=True)
    left = sorted({type(x).__module__ for x in merged.modules() if type(x).__module__.startswith("peft.")})
    if left:
        raise CheckpointError(f"{prep.adapter_dir}: peft layers remain after merge_and_unload ({', '.join(left)})")
    return merged.eval()


