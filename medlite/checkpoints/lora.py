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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from medlite.checkpoints.lora_keys import (PEFT_PREFIX, NameMap, check_lora_options, full_tensor_name,
                                          normalise_non_lora, read_adapter_config, split_lora_key, strip_peft_prefix)
from medlite.checkpoints.pool import TensorPool, _list_preview, sha256_file
from medlite.errors import CheckpointError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
# files of a training output folder that hold no model tensors (never opened)
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}
_EMBED = "model.language_model.embed_tokens"
# config.json fields that must agree between an adapter folder (LLaVA saves the model config there) and the base
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "mm_projector_type", "connector_type", "mm_hidden_size")


@dataclass
class _Full:
    """A full tensor from the adapter folder that replaces one base tensor."""

    canonical: str
    pool: TensorPool
    key: str


@dataclass
class _Prepared:
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
    full: list[_Full]
    nl_pool: Optional[TensorPool]
    notes: list[str] = field(default_factory=list)


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
        msg = (f"{f}: image_aspect_ratio {acfg['image_aspect_ratio']!r} differs from the base's; the adapter's is used "
               f"(as LLaVA's load_pretrained_model does), so images are {'padded' if spec.pad_to_square else 'not padded'}"
               f" to square")
        notes.append(msg)
        if ctx is not None:
            ctx.warn(msg)
    return spec


def _resolves(prep: _Prepared, name: str) -> bool:
    canonical = prep.names.canonical(name)
    ref = prep.plan.source_of(canonical) if canonical else None
    return ref is not None and ref[1] in ref[0]


def _map_full(prep: _Prepared, name: str, pool: TensorPool, key: str, origin: str, taken: dict) -> None:
    plan = prep.plan
    canonical = prep.names.canonical(name)
    ref = plan.source_of(canonical) if canonical else None
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
    prep.full.append(_Full(canonical, pool, key))


def _prepare(path, *, base, vision_tower, vision_weights, ctx) -> _Prepared:
    from medlite.checkpoints.loader import plan_checkpoint

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
    prep = _Prepared(adapter_dir, base_dir, base_from, cfg, options, plan, NameMap(plan), weights, pool, {}, [], nl_pool,
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
    elif cfg.get("base_model_name_or_path"):
        notes.append(f"adapter trained from base_model_name_or_path={cfg['base_model_name_or_path']!r}; "
                     f"--base {base_dir} used")
    return prep


@dataclass
class _Module:
    source: str
    canonical: str
    module: object
    parts: dict[str, str]
    r: int
    alpha: float
    grow: int = 0       # rows the canonical lm_head / embedding has beyond the source (image token)


def _check_modules(prep: _Prepared, model) -> list[_Module]:
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
        out.append(_Module(src, cm, mod, parts, r, alpha, grow))
    if lacking:
        raise CheckpointError(f"{pool.label}: the adapter targets module(s) the base {prep.plan.path} "
                              f"({prep.plan.fmt}) lacks: {_list_preview(lacking, 12)}")
    return out


def _lora_config(prep: _Prepared, mods: list[_Module]):
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


def _merge(prep: _Prepared, model, mods: list[_Module]):
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
        peft_model = get_peft_model(model, _lora_config(prep, mods))
        result = set_peft_model_state_dict(peft_model, state)
    expected = set(get_peft_model_state_dict(peft_model).keys())
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


def _adapter_files(prep: _Prepared) -> dict[str, str]:
    names = ["adapter_config.json", prep.weights.name, "config.json"]
    if prep.nl_pool is not None:
        names.append(NON_LORA)
    return {n: sha256_file(prep.adapter_dir / n) for n in sorted(set(names)) if (prep.adapter_dir / n).is_file()}


def _load(path, *, ctx, base, vision_tower, vision_weights, dtype, template, meta: bool):
    import torch

    from medlite.checkpoints.assemble import assemble
    from medlite.checkpoints.loader import _norm_dtype

    dtype = _norm_dtype(dtype) if not meta else None
    prep = _prepare(path, base=base, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)
    # fp32 for the merge itself (W + s·BA in half precision would round twice); cast afterwards
    loaded = assemble(prep.plan, dtype=None if meta else "float32", meta=meta, hash_files=not meta,
                      template=template, ctx=ctx)
    mods = _check_modules(prep, loaded.model)
    if meta:
        for m in mods:
            for key in m.parts.values():
                prep.pool.mark_used(key)
    else:
        loaded.model = _merge(prep, loaded.model, mods)
        if dtype and dtype != "float32":
            for p in loaded.model.parameters():  # parameters only: rotary / position buffers stay as built
                p.data = p.data.to(getattr(torch, dtype))
    for pool in (prep.pool, prep.nl_pool):
        if pool is not None:
            pool.check_all_consumed()
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
