"""LoRA / PEFT adapters (PeFoMed, MILE, TinyLLaVA ``finetune_lora``, LLaVA ``--lora_enable``) merged at load.

An adapter folder holds ``adapter_config.json``, ``adapter_model.safetensors`` (or ``.bin``), often
``non_lora_trainables.bin`` (projector and other fully trained tensors) and refers to the base
checkpoint it was trained from. The merge goes through the same loaders as the base:

1. plan the base with its own loader (legacy / Factory / HF), headers only;
2. map every adapter tensor from the base's source naming to canonical naming with the plan's rules;
   full tensors (``non_lora_trainables``, peft ``modules_to_save``, saved embedding layers, biases)
   replace the base tensors they name — same shape required — through extra exact-name plan rules,
   and the replaced base tensors are consumed as "replaced";
3. assemble the canonical model (every tensor consumed exactly once, as for any checkpoint);
4. inject the LoRA layers with **peft** (``get_peft_model`` with the mapped module names), load the
   renamed weights with ``set_peft_model_state_dict``, refuse anything unloaded or unexpected, and
   ``merge_and_unload``.

Nothing from the folders is executed; ``.bin`` files are read only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from medlite.checkpoints.lora_keys import (PEFT_PREFIX, NameMap, check_lora_options, full_tensor_name,
                                          normalise_non_lora, read_adapter_config, split_lora_key, strip_peft_prefix)
from medlite.checkpoints.lora_merge import FullTensor, Prepared, check_modules, dropped_by_base, merge_lora
from medlite.checkpoints.pool import TensorPool, _list_preview
from medlite.errors import CheckpointError
from medlite.fileio import sha256_file

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
# files of a training output folder that hold no model tensors (never opened)
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}
# config.json fields that must agree between an adapter folder (LLaVA saves the model config there) and the base
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "mm_projector_type", "connector_type", "mm_hidden_size")


def _file_pool(folder: Path, files: list[Path], label: str) -> TensorPool:
    """A :class:`TensorPool` over chosen files of a folder (the adapter folder mixes several kinds)."""
    from medlite.checkpoints.pool import _Entry, _load_bin, read_safetensors_header

    pool = TensorPool(label, folder)
    for f in files:
        if f.suffix == ".safetensors":
            for name, (dtype, shape) in read_safetensors_header(f).items():
                pool._add(name, _Entry(f, dtype, shape))
        else:
            tensors = _load_bin(f)  # torch.load(weights_only=True) with medlite's error messages
            pool._bins[f] = tensors
            for name, t in tensors.items():
                pool._add(name, _Entry(f, str(t.dtype).replace("torch.", ""), tuple(t.shape)))
    return pool


def resolve_base(adapter_dir: Path, cfg: dict, base) -> tuple[Path, str]:
    """The base checkpoint folder: ``base`` if given, else ``base_model_name_or_path`` when it is a local folder."""
    if base is not None:
        base_dir = Path(base).expanduser()
        if not base_dir.is_dir():
            raise CheckpointError(f"--base {base_dir}: folder not found")
        return base_dir, "--base"
    named = cfg.get("base_model_name_or_path")
    if isinstance(named, str) and named:
        # peft resolves the name from the working directory; a folder next to the adapter is also accepted
        for cand in (Path(named).expanduser(), adapter_dir / named):
            if (cand / "config.json").is_file():
                return cand, "adapter_config.json base_model_name_or_path"
    raise CheckpointError(
        f"{adapter_dir}: this LoRA adapter needs its base checkpoint — pass --base BASE_DIR (adapter_config.json names "
        f"base_model_name_or_path={named!r}, which is not a local checkpoint folder; nothing is downloaded)")


def _adapter_weights(adapter_dir: Path) -> tuple[Path, Optional[Path]]:
    present = [adapter_dir / n for n in ADAPTER_FILES if (adapter_dir / n).is_file()]
    if not present:
        raise CheckpointError(f"{adapter_dir}: adapter_config.json but no adapter weights "
                              f"({' or '.join(ADAPTER_FILES)})")
    if len(present) > 1:
        raise CheckpointError(f"{adapter_dir}: both {ADAPTER_FILES[0]} and {ADAPTER_FILES[1]} exist; it is unclear "
                              f"which holds the trained adapter — remove one")
    nl = adapter_dir / NON_LORA
    known = {present[0].name, NON_LORA} | _NOT_WEIGHTS
    other = sorted(p.name for p in adapter_dir.iterdir()
                   if p.is_file() and p.suffix in (".safetensors", ".bin") and p.name not in known)
    if other:
        raise CheckpointError(f"{adapter_dir}: weight file(s) medlite does not know how to apply: {', '.join(other)} "
                              f"(an adapter folder holds {ADAPTER_FILES[0]} / .bin and optionally {NON_LORA})")
    sub = [d for d in ("language_model", "connector", "vision_tower") if (adapter_dir / d).is_dir()]
    if sub:
        raise CheckpointError(f"{adapter_dir}: TinyLLaVA Factory LoRA output layout ({', '.join(sub)}/ subfolders "
                              f"with the base weights) is not supported; pass the Factory checkpoint the adapter was "
                              f"trained from as --base and an adapter folder without those subfolders")
    return present[0], (nl if nl.is_file() else None)


def _check_adapter_config_json(adapter_dir: Path, plan, notes: list[str], ctx) -> object:
    """LLaVA saves the training model's config.json next to the adapter; it must describe the base."""
    import json

    f = adapter_dir / "config.json"
    if not f.is_file():
        return plan.image_spec
    try:
        acfg = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    bcfg = plan.config_dict
    diff = [f"{k}: adapter {acfg[k]!r} vs base {bcfg[k]!r}" for k in _ARCH_FIELDS
            if k in acfg and k in bcfg and acfg[k] != bcfg[k]]
    if diff:
        raise CheckpointError(f"{f}: the adapter was trained on a different architecture than --base {plan.path} "
                              f"({'; '.join(diff)})")
    spec = plan.image_spec
    if "image_aspect_ratio" in acfg and (acfg["image_aspect_ratio"] == "pad") != spec.pad_to_square:
        # LLaVA / TinyLLaVA's builder loads the base weights with the adapter folder's config
        spec = replace(spec, pad_to_square=acfg["image_aspect_ratio"] == "pad")
        how = "padded" if spec.pad_to_square else "not padded"
        msg = (f"{f}: image_aspect_ratio {acfg['image_aspect_ratio']!r} differs from the base's; the adapter's is used "
               f"(as LLaVA's load_pretrained_model does), so images are {how} to square")
        notes.append(msg)
        if ctx is not None:
            ctx.warn(msg)
    return spec


def _resolves(prep: Prepared, name: str) -> bool:
    canonical = prep.names.canonical(name)
    ref = prep.plan.source_of(canonical) if canonical else None
    return ref is not None and ref[1] in ref[0]


def _map_full(prep: Prepared, name: str, pool: TensorPool, key: str, origin: str, taken: dict) -> None:
    plan = prep.plan
    canonical = prep.names.canonical(name)
    ref = plan.source_of(canonical) if canonical else None
    dropped = dropped_by_base(prep, canonical) if canonical else None
    if dropped:
        pool.discard([key], f"replaces a base tensor the conversion drops ({dropped})")
        return
    if ref is None or ref[1] not in ref[0]:
        raise CheckpointError(f"{pool.label}: {key} ({origin}) names {name}, which the base {plan.path} has no tensor "
                              f"for" + (f" (canonical {canonical})" if canonical else ""))
    bpool, bkey = ref
    if tuple(pool.shape(key)) != tuple(bpool.shape(bkey)):
        raise CheckpointError(f"{pool.label}: {key} has shape {tuple(pool.shape(key))} but the base tensor {bkey} it "
                              f"replaces has {tuple(bpool.shape(bkey))}")
    if canonical in taken:
        raise CheckpointError(f"{pool.label}: {key} and {taken[canonical]} both replace base tensor {bkey}")
    if canonical == "lm_head.weight" and getattr(plan.text_config, "tie_word_embeddings", False):
        raise CheckpointError(f"{pool.label}: {key} replaces lm_head, but the base ties lm_head to the embeddings")
    taken[canonical] = key
    prep.full.append(FullTensor(canonical, pool, key))


def _same_dir(named: str, base_dir: Path) -> bool:
    try:
        return Path(named).expanduser().resolve() == base_dir.resolve()
    except (OSError, ValueError):
        return False


def _prepare(path, *, base, vision_tower, vision_weights, ctx) -> Prepared:
    from medlite.checkpoints.planning import plan_checkpoint

    adapter_dir = Path(path).expanduser()
    cfg = read_adapter_config(adapter_dir)
    where = str(adapter_dir / "adapter_config.json")
    options, notes = check_lora_options(cfg, where)
    base_dir, base_from = resolve_base(adapter_dir, cfg, base)
    if (base_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"--base {base_dir} is itself a LoRA adapter; stacked adapters are not supported — "
                              f"merge the first one into a checkpoint (medlite convert) and use that as the base")
    weights, nl_file = _adapter_weights(adapter_dir)
    pool = _file_pool(adapter_dir, [weights], f"adapter {weights}")
    nl_pool = _file_pool(adapter_dir, [nl_file], f"adapter {nl_file}") if nl_file else None
    plan = plan_checkpoint(base_dir, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)
    prep = Prepared(adapter_dir, base_dir, base_from, cfg, options, plan, NameMap(plan), weights, pool, {}, [], nl_pool,
                     notes)
    plan.image_spec = _check_adapter_config_json(adapter_dir, plan, notes, ctx)

    taken: dict[str, str] = {}
    for name, key in strip_peft_prefix(pool.keys(), pool.label).items():
        split = split_lora_key(name)
        if split is not None:
            module, part = split
            prep.lora.setdefault(module, {})[part] = key
        else:  # modules_to_save, saved embedding layers (base_layer), trained biases: full tensors
            _map_full(prep, full_tensor_name(name), pool, key, "full tensor in the adapter", taken)
    if not prep.lora:
        raise CheckpointError(f"{pool.label}: no LoRA tensors (*.lora_A.weight / *.lora_B.weight) in the adapter")
    if nl_pool is not None:
        for name, key in normalise_non_lora(nl_pool.keys()).items():
            if not _resolves(prep, name) and key.startswith(PEFT_PREFIX) and _resolves(prep, key[len(PEFT_PREFIX):]):
                # PeftModel.named_parameters naming around a model whose names do not start with "model."
                # (a Factory base: base_model.model.connector.*), where LLaVA's rule would leave "model." on
                name = key[len(PEFT_PREFIX):]
            _map_full(prep, name, nl_pool, key, "non_lora_trainables", taken)
    # full tensors become exact-name plan rules (longer than any prefix rule, so they win in source_of);
    # the base tensors they replace are consumed here, so the base still ends fully consumed
    for f in prep.full:
        bpool, bkey = plan.source_of(f.canonical)
        bpool.discard([bkey], f"replaced by {f.pool.label}")
        plan.rules.append((f.canonical, f.pool, f.key))
    if base_from != "--base":
        notes.append(f"base checkpoint {base_dir} from adapter_config.json base_model_name_or_path")
    elif cfg.get("base_model_name_or_path") and not _same_dir(cfg["base_model_name_or_path"], base_dir):
        notes.append(f"adapter trained from base_model_name_or_path={cfg['base_model_name_or_path']!r}; "
                     f"--base {base_dir} used")
    return prep


def _adapter_files(prep: Prepared) -> dict[str, str]:
    names = ["adapter_config.json", prep.weights.name, "config.json"]
    if prep.nl_pool is not None:
        names.append(NON_LORA)
    return {n: sha256_file(prep.adapter_dir / n) for n in sorted(set(names)) if (prep.adapter_dir / n).is_file()}


def _load(path, *, ctx, base, vision_tower, vision_weights, dtype, template, meta: bool):
    import torch

    from medlite.checkpoints.assemble import assemble
    from medlite.checkpoints.planning import norm_dtype

    dtype = norm_dtype(dtype) if not meta else None
    prep = _prepare(path, base=base, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)
    # fp32 for the merge itself (W + s·BA in half precision would round twice); cast afterwards
    loaded = assemble(prep.plan, dtype=None if meta else "float32", meta=meta, hash_files=not meta,
                      template=template, ctx=ctx)
    mods = check_modules(prep, loaded.model)
    if meta:
        for m in mods:
            for key in m.parts.values():
                prep.pool.mark_used(key)
    else:
        loaded.model = merge_lora(prep, loaded.model, mods)
        if dtype and dtype != "float32":
            for p in loaded.model.parameters():  # parameters only: rotary / position buffers stay as built
                p.data = p.data.to(getattr(torch, dtype))
    for pool in (prep.pool, prep.nl_pool):
        if pool is not None:
            pool.check_all_consumed()
            for reason, names in pool.discarded().items():
                loaded.source.notes.append(f"consumed unused from {pool.label}: {_list_preview(names, 6)} — {reason}")
    n_nl = sum(1 for f in prep.full if f.pool is prep.nl_pool)
    leaves = sorted({m.canonical.rsplit(".", 1)[-1] for m in mods})
    ranks = sorted({m.r for m in mods})
    src = loaded.source
    src.adapter = {
        "path": str(prep.adapter_dir), "files": {} if meta else _adapter_files(prep),
        "base_path": str(prep.base_dir), "base_files": dict(src.files), "base_from": prep.base_from,
        "base_model_name_or_path": prep.cfg.get("base_model_name_or_path"),
        "peft_type": "LORA", "use_dora": bool(prep.options.get("use_dora")),
        "use_rslora": bool(prep.options.get("use_rslora")), "r": prep.cfg.get("r", 8),
        "lora_alpha": prep.cfg.get("lora_alpha", 8), "ranks": ranks,
        "target_modules": leaves, "config_target_modules": prep.cfg.get("target_modules"),
        "lora_modules": len(mods), "merged": not meta,
        "non_lora_tensors": n_nl, "adapter_full_tensors": len(prep.full) - n_nl,
    }
    src.name = prep.adapter_dir.name
    src.notes = list(prep.notes) + src.notes
    how = "merged with peft merge_and_unload" if not meta else "to be merged (inspect reads no tensor data)"
    src.notes.append(f"LoRA adapter {prep.adapter_dir.name}: {len(mods)} module(s) ({', '.join(leaves)}), rank "
                     f"{'/'.join(map(str, ranks))}, alpha {prep.cfg.get('lora_alpha', 8)}"
                     f"{', DoRA' if prep.options.get('use_dora') else ''} — {how}")
    if any(m.grow for m in mods):
        src.notes.append("LoRA on lm_head / embeddings: the appended image-token row gets no update")
    if dtype and dtype != "float32" and not meta:
        src.notes.append(f"merged in float32, then cast to {dtype}")
    return loaded


def load_adapter(path, *, ctx, base=None, vision_tower=None, vision_weights=None, dtype=None,
                 template: Optional[str] = None):
    """Load a LoRA adapter folder merged into its base checkpoint as the canonical :class:`LoadedModel`.

    ``base`` is the base checkpoint folder (legacy / Factory / HF); without it, the adapter's
    ``base_model_name_or_path`` is used when it is an existing local folder. ``vision_tower`` /
    ``vision_weights`` / ``template`` apply to the base as in :func:`medlite.checkpoints.load_model`;
    ``dtype`` is applied after the (float32) merge. ``source.format``, ``path`` and ``files`` describe the
    base; ``source.adapter`` records the adapter (path, hashes, peft options, modules, ``merged: True``).
    """
    with ctx.stage("load") as info:
        loaded = _load(path, ctx=ctx, base=base, vision_tower=vision_tower, vision_weights=vision_weights,
                       dtype=dtype, template=template, meta=False)
        a = loaded.source.adapter
        info["detail"] = (f"LoRA {Path(a['path']).name} (r={a['r']}, {a['lora_modules']} modules) merged into "
                          f"{Path(a['base_path']).name} ({loaded.source.format})")
    return loaded


def inspect_adapter(path, *, ctx=None, base=None, vision_tower=None, vision_weights=None,
                    template: Optional[str] = None):
    """Like :func:`load_adapter` on the ``meta`` device: every name, shape and option is checked, no merge."""
    return _load(path, ctx=ctx, base=base, vision_tower=vision_tower, vision_weights=vision_weights, dtype=None,
                 template=template, meta=True)


def describe_adapter(adapter: Optional[dict]) -> list[str]:
    """Human-readable lines for ``source.adapter`` (what ``medlite inspect`` prints)."""
    if not adapter:
        return []
    a = adapter
    kind = "DoRA" if a.get("use_dora") else "LoRA"
    state = "merged" if a.get("merged") else "checked, merged at load"
    lines = [f"adapter: {a['path']} ({a.get('peft_type', 'LORA')} {kind}, r={a['r']}, alpha={a['lora_alpha']}"
             f"{', rsLoRA' if a.get('use_rslora') else ''}) — {state}",
             f"  base: {a['base_path']} (from {a.get('base_from', '--base')})",
             f"  LoRA modules: {a['lora_modules']} ({', '.join(a.get('target_modules') or [])}), "
             f"ranks {'/'.join(map(str, a.get('ranks') or []))}",
             f"  full tensors replaced: {a.get('non_lora_tensors', 0)} from {NON_LORA}, "
             f"{a.get('adapter_full_tensors', 0)} from the adapter file"]
    return lines
