"""What ``medlite inspect`` and ``medlite plan`` need to know about a checkpoint, read without torch.

:func:`inspect_facts` plans the folder as the loader does (``config.json``, ``medlite_source.json``,
safetensors headers: 8-byte little-endian length + JSON with dtype / shape / offsets per tensor), maps
every source tensor to its canonical name with the plan's rules and counts parameters and bytes per
component from the header shapes — no transformers model is built, so neither torch nor transformers
is imported. Before it trusts the counts it checks names and shapes against the config (every layer
present and shaped like layer 0, embeddings / projector / attention / MLP sizes); a checkpoint that
fails a check is inspected on the ``meta`` device as before (:func:`medlite.checkpoints.inspect_checkpoint`,
imports torch), which reports the exact problem.

torch is still imported for: LoRA adapter folders (peft validates the adapter options and the target
modules), PyTorch ``*.bin`` weights (readable only through ``torch.load``), a tokenizer that exists only as
a SentencePiece model (converted through transformers), and a checkpoint whose vision weights must be
compared value by value with a ``--vision-tower`` copy. The built-in demo model is trained (with torch)
when it is not cached yet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medlite.checkpoints.assemble import _SYNTH_IDENTITY, EMBED, Plan, token_layout
from medlite.checkpoints.model import SourceInfo
from medlite.checkpoints.pool import _list_preview
from medlite.preprocess import ImageSpec
from medlite.prompting import template_for

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
LM, VT, PROJ, HEAD = "model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head."
_LAYER = re.compile(r"^(model\.language_model\.layers|model\.vision_tower\.encoder\.layers)\.(\d+)\.(.+)$")


@dataclass
class CheckpointFacts:
    """Architecture, parameter counts and processor facts of a checkpoint (what inspect and plan print)."""

    source: SourceInfo
    text: dict            # model_type, num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
                          # num_key_value_heads, head_dim, vocab_size (incl. <image>)
    vision: dict          # num_hidden_layers (used), hidden_size, intermediate_size, num_attention_heads, ...
    feature_select: str
    breakdown: dict       # as LoadedModel.param_breakdown(): vision_tower, projector, embeddings, llm, total
    tied: bool
    embed_params: int
    lm_head_params: int
    image_token_id: int
    num_image_tokens: int
    template: str
    image_spec: ImageSpec
    eos_token_ids: list = field(default_factory=list)
    bos_token_id: Optional[int] = None
    pad_token_id: int = 0
    read_with: str = "headers"   # "headers" (torch-free) | "meta" (torch, meta device)


def _text_dict(t, vocab: int) -> dict:
    heads = int(t.num_attention_heads)
    return {"model_type": t.model_type, "num_hidden_layers": int(t.num_hidden_layers), "hidden_size": int(t.hidden_size),
            "intermediate_size": int(t.intermediate_size), "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(t, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(t, "head_dim", None) or t.hidden_size // heads), "vocab_size": int(vocab),
            "max_position_embeddings": int(getattr(t, "max_position_embeddings", 0) or 0)}


def _vision_dict(v) -> dict:
    return {k: getattr(v, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "patch_size", "image_size")}


def facts_from_loaded(lm) -> CheckpointFacts:
    """The facts of a :class:`~medlite.checkpoints.LoadedModel` (loaded, or inspected on the meta device)."""
    m, cfg = lm.model, lm.model.config
    emb = m.model.language_model.get_input_embeddings().weight
    tied = m.lm_head.weight is emb
    return CheckpointFacts(
        source=lm.source, text=_text_dict(cfg.text_config, cfg.text_config.vocab_size),
        vision=_vision_dict(cfg.vision_config), feature_select=cfg.vision_feature_select_strategy,
        breakdown=lm.param_breakdown(), tied=tied, embed_params=emb.numel(),
        lm_head_params=0 if tied else m.lm_head.weight.numel(), image_token_id=lm.image_token_id,
        num_image_tokens=lm.num_image_tokens, template=lm.template.name, image_spec=lm.image_spec,
        eos_token_ids=lm.eos_token_ids, bos_token_id=lm.bos_token_id, pad_token_id=lm.pad_token_id, read_with="meta")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def canonical_shapes(plan: Plan) -> Optional[dict[str, tuple]]:
    """Canonical name -> source shape of every tensor the plan uses (None: a tensor maps nowhere).

    The inverse of :meth:`Plan.source_of`: the rule with the longest source prefix in the tensor's pool,
    confirmed by mapping the canonical name forward again. Tensors the plan discarded are skipped;
    the rest are marked used, as :func:`~medlite.checkpoints.assemble.assemble` does on the meta device.
    """
    tied_src = plan.tied_lm_head_source
    out: dict[str, tuple] = {}
    for pool in plan.pools:
        for key in pool.remaining():
            if tied_src is not None and tied_src[0] is pool and tied_src[1] == key:
                continue
            rules = [(c, s) for c, p, s in plan.rules if p is pool and key.startswith(s)]
            if not rules:
                return None
            cprefix, sprefix = max(rules, key=lambda r: len(r[1]))
            canonical = cprefix + key[len(sprefix):]
            back = plan.source_of(canonical)
            if back is None or back[0] is not pool or back[1] != key or canonical in out:
                return None
            out[canonical] = tuple(pool.shape(key))
            pool.mark_used(key)
    if tied_src is not None:
        tied_src[0].discard([tied_src[1]], "duplicate of the tied input embeddings")
    return out


def _layers_problem(shapes: dict, group: str, count: int) -> Optional[str]:
    layers: dict[int, dict] = {}
    for k, s in shapes.items():
        m = _LAYER.match(k)
        if m and m.group(1) == group:
            layers.setdefault(int(m.group(2)), {})[m.group(3)] = s
    if sorted(layers) != list(range(count)):
        return f"{group}: layers {sorted(layers)}, config says {count}"
    bad = [i for i, v in layers.items() if v != layers[0]]
    return f"{group}.{bad[0]} differs from layer 0" if bad else None


def _shape_problem(shapes: dict, plan: Plan, vocab_rows: int) -> Optional[str]:
    """Why the shapes do not fit the config (None: they do, as far as headers tell)."""
    t, v = plan.text_config, plan.vision_config
    h, vh, heads, kv, hd = t.hidden_size, v.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    want = {EMBED: (vocab_rows, h), PROJ + "linear_1.weight": (h, vh), PROJ + "linear_1.bias": (h,),
            PROJ + "linear_2.weight": (h, h), PROJ + "linear_2.bias": (h,),
            VT + "embeddings.patch_embedding.weight": (vh, v.num_channels, v.patch_size, v.patch_size),
            VT + "embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2, vh),
            LM + "layers.0.self_attn.q_proj.weight": (heads * hd, h), LM + "layers.0.self_attn.k_proj.weight": (kv * hd, h),
            VT + "encoder.layers.0.self_attn.q_proj.weight": (vh, vh), VT + "encoder.layers.0.mlp.fc1.weight": (v.intermediate_size, vh)}
    if not t.tie_word_embeddings:
        want[HEAD + "weight"] = (vocab_rows, h)
    for k, s in want.items():
        if shapes.get(k) != s:
            return f"{k}: {shapes.get(k)} vs {s}"
    mlp = shapes.get(LM + "layers.0.mlp.gate_proj.weight") or shapes.get(LM + "layers.0.mlp.fc1.weight")
    if mlp is None or mlp[0] != t.intermediate_size:
        return f"MLP {mlp} vs intermediate_size {t.intermediate_size}"
    top = {k[len(LM):] for k in shapes if k.startswith(LM) and not k.startswith(LM + "layers.")}
    norm = {"phi": {"final_layernorm.weight", "final_layernorm.bias"}, "stablelm": {"norm.weight", "norm.bias"}}
    if top != {"embed_tokens.weight"} | norm.get(plan.text_backbone, {"norm.weight"}):
        return f"language model tensors {sorted(top)}"
    return (_layers_problem(shapes, "model.language_model.layers", t.num_hidden_layers)
            or _layers_problem(shapes, "model.vision_tower.encoder.layers", v.num_hidden_layers))


def _breakdown(shapes: dict, itemsize: int, tied: bool) -> dict:
    def part(keys) -> dict:
        n = sum(_numel(shapes[k]) for k in keys)
        return {"params": n, "bytes": n * itemsize}

    emb_keys = [EMBED] + ([] if tied else [HEAD + "weight"])
    out = {"vision_tower": part(k for k in shapes if k.startswith(VT)),
           "projector": part(k for k in shapes if k.startswith(PROJ)),
           "embeddings": part(emb_keys),
           "llm": part(k for k in shapes if k.startswith(LM) and k != EMBED)}
    out["total"] = {"params": sum(p["params"] for p in out.values()), "bytes": sum(p["bytes"] for p in out.values())}
    return out


def facts_from_plan(plan: Plan, *, template: Optional[str] = None, ctx=None) -> Optional[CheckpointFacts]:
    """The facts of a planned checkpoint from its headers; None when names or shapes need the full check."""
    notes = list(plan.notes)
    _, sp, image_id, vocab = token_layout(plan, notes, ctx)
    shapes = canonical_shapes(plan)
    if shapes is None:
        return None
    for key in (EMBED, HEAD + "weight"):      # the image-token row (when appended) is part of the canonical table
        if key in shapes:
            shapes[key] = (vocab, *shapes[key][1:])
    synth = [k for k in _SYNTH_IDENTITY if k not in shapes]
    for k in synth:
        shapes[k] = (plan.vision_config.hidden_size,)
    if _shape_problem(shapes, plan, vocab) is not None:
        return None
    shapes.pop(HEAD + "bias", None)   # Phi's lm_head bias: LoadedModel.param_breakdown counts weights only
    if synth:
        notes.append("vision post_layernorm synthesized as identity (weight 1, bias 0): the source has none and the "
                     "selected hidden state is taken before it, so it never runs — not a source tensor")
    for pool in plan.pools:
        for reason, names in pool.discarded().items():
            notes.append(f"consumed unused from {pool.label}: {_list_preview(names, 6)} — {reason}")
    dtype = plan.pools[0].main_dtype()
    tied = plan.text_config.tie_word_embeddings
    source = SourceInfo(format=plan.fmt, path=str(plan.path), files={}, text_backbone=plan.text_backbone, dtype=dtype,
                        vision_weights=plan.vision_weights, vision_tower=plan.vision_tower,
                        name=plan.name or plan.path.name, notes=notes)
    return CheckpointFacts(
        source=source, text=_text_dict(plan.text_config, vocab), vision=_vision_dict(plan.vision_config),
        feature_select=plan.select_strategy, breakdown=_breakdown(shapes, _ITEMSIZE[dtype], tied), tied=tied,
        embed_params=_numel(shapes[EMBED]), lm_head_params=0 if tied else _numel(shapes[HEAD + "weight"]),
        image_token_id=image_id, num_image_tokens=plan.num_image_tokens,
        template=template_for(template or plan.template_name).name,
        image_spec=plan.image_spec, eos_token_ids=sp["eos_token_ids"], bos_token_id=sp["bos_token_id"],
        pad_token_id=sp["pad_token_id"])


def inspect_facts(path, *, ctx=None, base=None, vision_tower=None, vision_weights=None,
                  template: Optional[str] = None) -> CheckpointFacts:
    """:class:`CheckpointFacts` of a checkpoint folder: from headers when it can, else on the meta device."""
    from medlite.checkpoints.planning import plan_checkpoint

    path = Path(path).expanduser()
    if base is None and not (path / "adapter_config.json").is_file():
        plan = plan_checkpoint(path, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)
        facts = facts_from_plan(plan, template=template, ctx=ctx)
        if facts is not None:
            return facts
    from medlite.checkpoints.loader import inspect_checkpoint

    return facts_from_loaded(inspect_checkpoint(path, ctx=ctx, base=base, vision_tower=vision_tower,
                                                vision_weights=vision_weights, template=template))


__all__ = ["CheckpointFacts", "canonical_shapes", "facts_from_loaded", "facts_from_plan", "inspect_facts"]
