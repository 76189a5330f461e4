"""Format detection and the three loaders' plans: legacy TinyLLaVA, TinyLLaVA Factory, HF Llava.

Each ``plan_*`` reads ``config.json`` and tensor headers, decides the canonical architecture and
which source tensor fills which canonical parameter, and records every decision in ``notes``.
Semantics reproduced (checked against the original code, see docs/checkpoints.md):

* legacy ``SigLipVisionTower``: ``del encoder.layers[-1:]``, ``head = Identity``, features =
  ``hidden_states[-1]`` of the remaining layers (before post_layernorm), all patches (729 for
  so400m-384); ``mm_vision_select_layer`` is ignored by that tower class;
* Factory ``VisionTower.forward``: ``hidden_states[vision_feature_layer]`` (default -2) and, for
  ``vision_feature_select_strategy == "patch"``, ``[:, 1:]`` — SigLIP has no CLS token, so this drops
  the first real patch (728 tokens);
* HF Llava: the checkpoint's own ``vision_feature_layer`` / ``vision_feature_select_strategy``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from medlite.checkpoints.assemble import Plan
from medlite.checkpoints.pool import TensorPool
from medlite.checkpoints.configspec import text_spec, vision_spec
from medlite.checkpoints.textmodels import detect_backbone
from medlite.checkpoints.vision import (TowerCopy, choose_vision_source, layer_count, resolve_vision_config,
                                        vision_prefix)
from medlite.errors import CheckpointError
from medlite.preprocess import ImageSpec

LEGACY_TEMPLATES = {"llama": "vicuna_v1", "phi": "phi", "stablelm": "phi", "qwen2": "qwen2_base"}
FACTORY_TEMPLATES = {"llama": "llama", "phi": "phi", "qwen2": "qwen2_base", "stablelm": "phi"}


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json — not a checkpoint folder")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return cfg


def detect_format(cfg: dict, *, where: str = "config.json") -> str:
    """"legacy" | "factory" | "hf" from config.json fields."""
    mt = str(cfg.get("model_type", ""))
    archs = [str(a) for a in cfg.get("architectures") or []]
    if mt == "tinyllava" and ("llm_model_name_or_path" in cfg or "connector_type" in cfg):
        return "factory"
    if "mm_vision_tower" in cfg or "mm_projector_type" in cfg:
        return "legacy"
    if mt == "llava" or "LlavaForConditionalGeneration" in archs:
        return "hf"
    raise CheckpointError(f"{where}: not a TinyLLaVA / Llava checkpoint (model_type={mt!r}, architectures={archs}); "
                          f"expected a legacy TinyLLaVA config (mm_vision_tower), a TinyLLaVA Factory config "
                          f"(model_type 'tinyllava' with llm_model_name_or_path) or an HF Llava config")


def _json_file(f: Path) -> dict:
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def _medlite_json(path: Path) -> dict:
    f = path / "medlite_source.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def recorded_name(path: Path) -> Optional[str]:
    """The model name recorded in ``medlite_source.json`` by the writer that made the folder, or None."""
    name = _medlite_json(Path(path)).get("name")
    return name if isinstance(name, str) and name else None


def _template(path: Path, default: str, notes: list[str], *, why: str) -> str:
    recorded = _medlite_json(path).get("template")
    if isinstance(recorded, dict):
        recorded = recorded.get("name")
    if recorded:
        notes.append(f"chat template {recorded!r} recorded in medlite_source.json")
        return recorded
    notes.append(f"chat template {default!r}: {why}")
    return default


def _used_layers(total: int, feature_layer: int, where: str) -> int:
    """How many encoder layers ``hidden_states[feature_layer]`` depends on (hidden_states[0] = embeddings)."""
    used = total + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= used <= total:
        raise CheckpointError(f"{where}: vision_feature_layer {feature_layer} is outside a {total}-layer tower")
    return used


def _discard_unused_vision(pool: TensorPool, prefix: str, used: int, reason: str) -> None:
    import re

    layer = re.compile(r"^encoder\.layers\.(\d+)\.")
    drop = []
    for k in pool.with_prefix(prefix):
        rest = k[len(prefix):]
        m = layer.match(rest)
        if (m and int(m.group(1)) >= used) or rest.startswith("head."):
            drop.append(k)
    pool.discard([k for k in drop if k not in pool.consumed], reason)


def _discard_unused_both(pool: TensorPool, prefix: Optional[str], tower: Optional[TowerCopy], used: int,
                         reason: str) -> None:
    """Unused layers / head in the checkpoint and in the tower copy, plus the tower repo's text half."""
    if prefix is not None:
        _discard_unused_vision(pool, prefix, used, reason)
    if tower is not None and tower.pool is not None:
        _discard_unused_vision(tower.pool, tower.prefix, used, reason)
        tower.discard_non_vision()


def _spec(pre: dict, *, pad: bool, vcfg, where: str) -> ImageSpec:
    spec = ImageSpec.from_preprocessor_config(pre, pad_to_square=pad)
    if spec.size != vcfg.image_size:
        raise CheckpointError(f"{where}: the preprocessor resizes to {spec.size} px but the vision tower expects "
                              f"{vcfg.image_size} px")
    return spec


def _tower(path: Path, vision_tower: Optional[str], hub_id: Optional[str], notes: list[str]) -> Optional[TowerCopy]:
    if vision_tower:
        return TowerCopy.open(vision_tower)
    # the original builder accepts an existing local path as mm_vision_tower; medlite also resolves it
    # relative to the checkpoint folder, and uses a tower copy shipped inside it as vision_tower/, so that
    # checkpoint + tower copy can travel together
    cands = ([Path(hub_id), path / hub_id] if hub_id else []) + [path / "vision_tower"]
    for cand in cands:
        if (cand / "config.json").is_file() and cand.resolve() != path.resolve():
            notes.append(f"vision tower copy found next to the checkpoint: {cand}")
            return TowerCopy.open(cand)
    return None


def _tower_info(tower: Optional[TowerCopy]) -> Optional[dict]:
    return None if tower is None else {"path": str(tower.path), "files": tower.files}


def plan_legacy(path: Path, cfg: dict, pool: TensorPool, *, vision_tower=None, vision_weights=None, ctx=None) -> Plan:
    """Legacy TinyLLaVA (TinyLLaVA-Med, bczhou/TinyLLaVA-*): ``model.*`` + ``model.mm_projector`` + ``lm_head``."""
    where = str(path / "config.json")
    notes: list[str] = []
    backbone = detect_backbone(cfg.get("model_type", ""), cfg.get("architectures") or [], pool.keys(), where=where)
    text = text_spec(cfg, backbone, where=where)
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype != "mlp2x_gelu":
        raise CheckpointError(f"{where}: mm_projector_type {ptype!r} is not supported (only mlp2x_gelu, which maps "
                              f"onto Llava's linear_1 → GELU → linear_2)")
    hub_id = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    tower = _tower(path, vision_tower, hub_id, notes)
    if tower is None and "siglip" not in str(hub_id).lower():
        raise CheckpointError(f"{where}: mm_vision_tower {hub_id!r} is not a SigLIP tower; only SigLIP towers are "
                              f"supported (TinyLLaVA's CLIP variants select a different feature layer)")
    ck_prefix = vision_prefix(pool, ["model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower."])
    vcfg, pre = resolve_vision_config(hub_id=hub_id, tower=tower, pool=pool if ck_prefix else None, prefix=ck_prefix,
                                      base=None, notes=notes, where=where)
    total = int(vcfg.get("num_hidden_layers", 0))
    used = total - 1  # SigLipVisionTower.load_model: del vision_model.encoder.layers[-1:]
    if ck_prefix is not None:
        n = layer_count(pool, ck_prefix)
        if n == total:
            notes.append(f"checkpoint holds all {total} tower layers; the last is deleted by SigLipVisionTower")
        elif n != used:
            raise CheckpointError(f"{where}: the checkpoint's vision tower has {n} layers; the tower config says "
                                  f"{total}, of which TinyLLaVA keeps {used}")
    reason = "dropped by TinyLLaVA's SigLipVisionTower (del encoder.layers[-1:], head = Identity)"
    _discard_unused_both(pool, ck_prefix, tower, used, reason)
    vpool, vprefix, vw = choose_vision_source(ckpt=pool, ckpt_prefix=ck_prefix, tower=tower, layers_used=used,
                                              choice=vision_weights, notes=notes, where=where, hub_id=hub_id)
    notes.append(f"vision features: hidden_states[-1] of the {used} kept SigLIP layers, all "
                 f"{(vcfg['image_size'] // vcfg['patch_size']) ** 2} patches (SigLipVisionTower ignores "
                 f"mm_vision_select_layer={cfg.get('mm_vision_select_layer')})")
    vc = vision_spec(vcfg, layers=used)
    rules = [("model.language_model.", pool, "model."), ("lm_head.", pool, "lm_head."),
             ("model.multi_modal_projector.linear_1.", pool, "model.mm_projector.0."),
             ("model.multi_modal_projector.linear_2.", pool, "model.mm_projector.2."),
             ("model.vision_tower.", vpool, vprefix)]
    pools = [pool] + ([tower.pool] if tower is not None and tower.pool is not None else [])
    tname = _template(path, LEGACY_TEMPLATES[backbone], notes,
                      why=f"TinyLLaVA's conversation mode for a {backbone} backbone"
                          + ("" if backbone in ("llama", "phi") else " (a guess: override with --template)"))
    return Plan("legacy", path, backbone, text, vc, "full", rules,
                _spec(pre, pad=cfg.get("image_aspect_ratio") == "pad", vcfg=vc, where=where), tname, path, cfg,
                pools, notes, vision_weights=vw, vision_tower=_tower_info(tower),
                lm_head_bias="lm_head.bias" in pool,
                tied_lm_head_source=_tied(text, pool, "lm_head.weight"))


def _tied(text, pool: TensorPool, key: str):
    return (pool, key) if getattr(text, "tie_word_embeddings", False) and key in pool else None


def plan_factory(path: Path, cfg: dict, pool: TensorPool, *, vision_tower=None, vision_weights=None, ctx=None) -> Plan:
    """TinyLLaVA Factory: ``language_model.*``, ``vision_tower._vision_tower.*``, ``connector._connector.*``."""
    where = str(path / "config.json")
    notes: list[str] = []
    tcfg = cfg.get("text_config")
    if not isinstance(tcfg, dict):
        raise CheckpointError(f"{where}: Factory config without a text_config dict")
    backbone = detect_backbone(tcfg.get("model_type", ""), tcfg.get("architectures") or [],
                               [k[len("language_model."):] for k in pool.with_prefix("language_model.")], where=where)
    text = text_spec(tcfg, backbone, where=where + " text_config")
    ctype = cfg.get("connector_type")
    if ctype != "mlp2x_gelu":
        raise CheckpointError(f"{where}: connector_type {ctype!r} is not supported (only mlp2x_gelu)")
    hub_id = cfg.get("vision_model_name_or_path")
    tower = _tower(path, vision_tower, None, notes)
    ck_prefix = vision_prefix(pool, ["vision_tower._vision_tower.vision_model.", "vision_tower._vision_tower."])
    base = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else None
    vcfg, pre = resolve_vision_config(hub_id=hub_id, tower=tower, pool=pool if ck_prefix else None, prefix=ck_prefix,
                                      base=base, notes=notes, where=where, preprocessor=_json_file(path / "preprocessor_config.json"))
    total = int(vcfg.get("num_hidden_layers", 0))
    if ck_prefix is not None and layer_count(pool, ck_prefix) != total:
        raise CheckpointError(f"{where}: vision_config says {total} layers, the checkpoint has "
                              f"{layer_count(pool, ck_prefix)}")
    feature_layer = int(cfg.get("vision_feature_layer", -2))
    used = _used_layers(total, feature_layer, where)
    strategy = cfg.get("vision_feature_select_strategy", "patch")
    if strategy not in ("patch", "cls_patch"):
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r} unknown (patch | cls_patch)")
    _discard_unused_both(pool, ck_prefix, tower, used,
                         f"not reached by hidden_states[{feature_layer}] (Factory VisionTower.forward)")
    vpool, vprefix, vw = choose_vision_source(ckpt=pool, ckpt_prefix=ck_prefix, tower=tower, layers_used=used,
                                              choice=vision_weights, notes=notes, where=where, hub_id=hub_id)
    side = int(vcfg["image_size"]) // int(vcfg["patch_size"])
    if strategy == "patch":
        notes.append(f"Factory selects hidden_states[{feature_layer}] and drops the first token ([:, 1:]); SigLIP "
                     f"has no CLS token, so one real patch is dropped: {side * side - 1} image tokens — reproduced "
                     f"as in the source, not corrected")
    else:
        notes.append(f"Factory selects hidden_states[{feature_layer}], all {side * side} tokens (cls_patch)")
    notes.append("vision post_layernorm is carried over but never runs (the selected hidden state precedes it)")
    vc = vision_spec(vcfg, layers=used)
    rules = [("model.language_model.", pool, "language_model.model."), ("lm_head.", pool, "language_model.lm_head."),
             ("model.multi_modal_projector.linear_1.", pool, "connector._connector.0."),
             ("model.multi_modal_projector.linear_2.", pool, "connector._connector.2."),
             ("model.vision_tower.", vpool, vprefix)]
    pools = [pool] + ([tower.pool] if tower is not None and tower.pool is not None else [])
    tname = _template(path, FACTORY_TEMPLATES[backbone], notes,
                      why=f"TinyLLaVA Factory's template for a {backbone} LLM"
                          + (" (a guess: override with --template)" if backbone == "stablelm" else ""))
    return Plan("factory", path, backbone, text, vc, "default" if strategy == "patch" else "full", rules,
                _spec(pre, pad=cfg.get("image_aspect_ratio") == "pad", vcfg=vc, where=where), tname, path, cfg,
                pools, notes, vision_weights=vw, vision_tower=_tower_info(tower),
                lm_head_bias="language_model.lm_head.bias" in pool,
                tied_lm_head_source=_tied(text, pool, "language_model.lm_head.weight"))


def plan_hf(path: Path, cfg: dict, pool: TensorPool, *, vision_tower=None, vision_weights=None, ctx=None) -> Plan:
    """HF ``LlavaForConditionalGeneration``, old (``language_model.model.*``) or new (``model.language_model.*``) keys."""
    where = str(path / "config.json")
    notes: list[str] = []
    if vision_tower:
        raise CheckpointError(f"{where}: an HF Llava checkpoint carries its vision tower; --vision-tower is only for "
                              f"legacy / Factory checkpoints")
    tcfg, vcfg = cfg.get("text_config"), cfg.get("vision_config")
    if not isinstance(tcfg, dict) or not isinstance(vcfg, dict):
        raise CheckpointError(f"{where}: HF Llava config needs text_config and vision_config dicts")
    if "siglip" not in str(vcfg.get("model_type", "")):
        raise CheckpointError(f"{where}: vision model {vcfg.get('model_type')!r} not supported (SigLIP towers only)")
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or cfg.get("multimodal_projector_bias", True) is not True:
        raise CheckpointError(f"{where}: only the GELU projector with biases is supported "
                              f"(projector_hidden_act={cfg.get('projector_hidden_act')!r})")
    if "model.language_model.embed_tokens.weight" in pool:
        lm, head, proj, vcands, layout = ("model.language_model.", "lm_head.", "model.multi_modal_projector.",
                                          ["model.vision_tower.vision_model.", "model.vision_tower."], "current")
    else:
        lm, head, proj, vcands, layout = ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.",
                                          ["vision_tower.vision_model.", "vision_tower."], "save_pretrained")
    notes.append(f"HF Llava key layout: {layout} ({lm}*, {proj}*)")
    backbone = detect_backbone(tcfg.get("model_type", ""), tcfg.get("architectures") or [], [], where=where)
    text = text_spec(tcfg, backbone, where=where + " text_config")
    vprefix = vision_prefix(pool, vcands)
    if vprefix is None:
        raise CheckpointError(f"{where}: no vision tower tensors ({vcands[0]}embeddings.patch_embedding.weight)")
    total = int(vcfg.get("num_hidden_layers", 12))
    fl = cfg.get("vision_feature_layer", -2)
    if not isinstance(fl, int):
        raise CheckpointError(f"{where}: vision_feature_layer {fl!r}: only a single layer is supported")
    used = _used_layers(total, fl, where)
    strategy = cfg.get("vision_feature_select_strategy", "default")
    _discard_unused_vision(pool, vprefix, used, f"not reached by hidden_states[{fl}] (Llava get_image_features)")
    vc = vision_spec(vcfg, layers=used)
    meta = _medlite_json(path)
    if isinstance(meta.get("image_spec"), dict):
        spec = ImageSpec.from_dict(meta["image_spec"])
        notes.append("image preprocessing recorded in medlite_source.json")
    else:
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        if not pre:
            raise CheckpointError(f"{path}: no preprocessor_config.json (and no medlite_source.json image_spec)")
        spec = _spec(pre, pad=False, vcfg=vc, where=where)
    tname = _template(path, "vicuna_v1", notes, why="HF Llava records no template; TinyLLaVA-Med's vicuna_v1 assumed")
    if "recorded" not in notes[-1] and ctx is not None:
        ctx.warn(f"{path}: no chat template recorded; assuming vicuna_v1 (override with --template)")
    image_index = cfg.get("image_token_index", cfg.get("image_token_id"))
    return Plan("hf", path, backbone, text, vc, strategy, [("model.language_model.", pool, lm), ("lm_head.", pool, head),
                ("model.multi_modal_projector.", pool, proj), ("model.vision_tower.", pool, vprefix)],
                spec, tname, path, cfg, [pool], notes, lm_head_bias=head + "bias" in pool,
                existing_image_token_id=int(image_index) if image_index is not None and
                int(image_index) < int(text.vocab_size) else None,
                tied_lm_head_source=_tied(text, pool, head + "weight"))


PLANNERS = {"legacy": plan_legacy, "factory": plan_factory, "hf": plan_hf}
