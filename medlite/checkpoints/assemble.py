"""Build the canonical ``LlavaForConditionalGeneration`` from a format-specific :class:`Plan`.

A plan says *which source tensor* fills each canonical parameter (prefix rules per format) and
carries the configs, processor facts and notes. Assembly then

* reads the tokenizer and places ``<image>`` right after the source vocabulary,
* creates the model without initialising it (or on the ``meta`` device for ``inspect``),
* fills every parameter from exactly one source tensor (shape-checked, cast to the target dtype),
  appending the image-token row (embedding: mean of the existing rows; ``lm_head``: zero),
* refuses missing or leftover tensors, listing them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medlite.checkpoints.model import LoadedModel, SourceInfo
from medlite.checkpoints.pool import TensorPool, _list_preview
from medlite.errors import CheckpointError
from medlite.preprocess import ImageSpec

EMBED = "model.language_model.embed_tokens.weight"
# canonical parameters that the source may lack because the canonical module has them but the
# source forward never reads them (selected hidden states are taken before post_layernorm)
_SYNTH_IDENTITY = {"model.vision_tower.post_layernorm.weight": 1.0, "model.vision_tower.post_layernorm.bias": 0.0}


@dataclass
class Plan:
    """Everything format-specific a loader works out; :func:`assemble` does the rest."""

    fmt: str
    path: Path
    text_backbone: str
    text_config: Any                     # configspec.TextSpec, vocab_size = source embedding rows
    vision_config: Any                   # configspec.VisionSpec: layers actually used, no head
    select_strategy: str                 # "full" (all patches) | "default" (drop the first token)
    rules: list[tuple[str, TensorPool, str]]   # (canonical prefix, pool, source prefix)
    image_spec: ImageSpec
    template_name: str
    tokenizer_dir: Path
    config_dict: dict
    pools: list[TensorPool]
    notes: list[str] = field(default_factory=list)
    vision_weights: Optional[str] = None
    vision_tower: Optional[dict] = None
    lm_head_bias: bool = False
    existing_image_token_id: Optional[int] = None  # HF Llava sources already have one
    tied_lm_head_source: Optional[tuple[TensorPool, str]] = None  # a duplicate lm_head in a tied model
    name: str = ""                       # model name recorded by the writer (else the folder name)

    def source_of(self, key: str) -> Optional[tuple[TensorPool, str]]:
        best = None
        for cprefix, pool, sprefix in self.rules:
            if key.startswith(cprefix) and (best is None or len(cprefix) > len(best[0])):
                best = (cprefix, pool, sprefix)
        if best is None:
            return None
        cprefix, pool, sprefix = best
        return pool, sprefix + key[len(cprefix):]

    @property
    def num_image_tokens(self) -> int:
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side * side - (1 if self.select_strategy == "default" else 0)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name.replace("torch.", ""))


def build_llava_config(plan: Plan, vocab: int, image_token_id: int):
    """The LlavaConfig of the canonical model (vocabulary including the image token)."""
    from transformers import LlavaConfig

    text = plan.text_config.to_transformers()
    text.vocab_size = vocab
    return LlavaConfig(vision_config=plan.vision_config.to_transformers().to_dict(), text_config=text.to_dict(),
                       image_token_index=image_token_id, projector_hidden_act="gelu", vision_feature_layer=-1,
                       vision_feature_select_strategy=plan.select_strategy,
                       image_seq_length=plan.num_image_tokens,
                       tie_word_embeddings=bool(getattr(plan.text_config, "tie_word_embeddings", False)))


def empty_model(config, *, meta: bool, lm_head_bias: bool):
    """An uninitialised canonical model (``meta``: no storage at all, for inspect)."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    if meta:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
    else:
        # no_init_weights: parameters stay torch.empty (untouched pages), replaced below
        with no_init_weights():
            model = LlavaForConditionalGeneration(config)
    if lm_head_bias:
        # Phi-2's lm_head has a bias; Llava's does not. Keep it (outputs must not change).
        old = model.lm_head
        dev = "meta" if meta else "cpu"
        model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True, device=dev)
    from medlite.checkpoints.token_pool import install_from_config

    install_from_config(model)      # a tokens stage's pooling, recorded in the config (stage-output cache)
    return model


def _fit_rows(t, rows: int, *, key: str, mean_fill: bool):
    """Append rows (image token, placeholders) to an embedding / lm_head tensor."""
    import torch

    extra = rows - t.shape[0]
    if extra == 0:
        return t
    if mean_fill:
        pad = t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(extra, *t.shape[1:])
    else:
        pad = torch.zeros((extra, *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


def token_layout(plan: Plan, notes: list[str], ctx=None) -> tuple[Any, dict, int, int]:
    """The tokenizer, its special ids, the image token id and the canonical vocabulary size.

    ``<image>`` goes right after the source vocabulary (or keeps an HF Llava source's own id); the
    decisions are appended to ``notes``. Shared by :func:`assemble` and the torch-free
    :mod:`medlite.checkpoints.headers`, so both report the same ids.
    """
    from medlite.checkpoints.tokenizer import load_tokenizer, special_ids, vocab_end
    from medlite.checkpoints.textmodels import default_bos

    tok = load_tokenizer(plan.tokenizer_dir)
    sp = special_ids(plan.tokenizer_dir, tok, plan.config_dict, default_add_bos=default_bos(plan.text_backbone))
    rows = int(plan.text_config.vocab_size)
    src = plan.source_of(EMBED)
    if src is not None and src[1] in src[0]:
        src_rows = src[0].shape(src[1])[0]
        if src_rows != rows:
            raise CheckpointError(f"{plan.path}: vocab_size is {rows} in the config but {src[1]} has {src_rows} rows")
    end = vocab_end(tok)
    if plan.existing_image_token_id is not None:
        image_id = plan.existing_image_token_id
        if tok.token_to_id("<image>") != image_id or image_id >= rows:
            raise CheckpointError(f"{plan.path}: image_token_index is {image_id} but the tokenizer has <image> at "
                                  f"{tok.token_to_id('<image>')} (vocabulary {rows} rows)")
        notes.append(f"image token id {image_id} taken from the source (its lm_head row is the source's; generation "
                     f"suppresses the id)")
        return tok, sp, image_id, rows  # nothing appended
    if end > rows:
        msg = (f"tokenizer has {end} tokens but the embedding only {rows} rows; ids {rows}..{end - 1} would have "
               f"crashed the source model — they get mean-embedding rows here")
        notes.append(msg)
        if ctx is not None:
            ctx.warn(msg)
    image_id = max(rows, end)
    return tok, sp, image_id, image_id + 1


def assemble(plan: Plan, *, dtype: Optional[str] = None, meta: bool = False, hash_files: bool = True,
             template: Optional[str] = None, ctx=None) -> LoadedModel:
    """Turn a plan into a :class:`LoadedModel` (``meta=True``: shapes only, nothing is read)."""
    import torch

    from medlite.checkpoints.tokenizer import with_image_token
    from medlite.prompting import template_for

    notes = list(plan.notes)
    tok, sp, image_id, vocab = token_layout(plan, notes, ctx)
    config = build_llava_config(plan, vocab, image_id)
    target = dtype or ("float32" if not meta else plan.pools[0].main_dtype())
    tdtype = _torch_dtype(target)
    model = empty_model(config, meta=meta, lm_head_bias=plan.lm_head_bias)

    sd = model.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    todo, missing, synth = [], [], []
    for key, p in sd.items():
        if id(p) in seen or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue  # tied parameter (lm_head ↔ embed_tokens): filled once, tied below
        seen[id(p)] = key
        ref = plan.source_of(key)
        if ref is not None and ref[1] in ref[0]:
            todo.append((key, p, ref))
        elif key in _SYNTH_IDENTITY:
            synth.append((key, p))
        else:
            missing.append(f"{key} (expected {ref[1] if ref else 'no source rule'})")
    if missing:
        raise CheckpointError(f"{plan.path}: the checkpoint lacks tensors the model needs — missing "
                              f"{_list_preview(missing)}")
    for key, p, (pool, skey) in todo:
        shape = pool.shape(skey)
        want = tuple(p.shape)
        grow = key in (EMBED, "lm_head.weight", "lm_head.bias") and shape[0] <= want[0] and shape[1:] == want[1:]
        if shape != want and not grow:
            raise CheckpointError(f"{pool.label}: {skey} has shape {shape}, the model needs {want} for {key}")
        if meta:
            pool.mark_used(skey)
            p.data = torch.empty(want, dtype=tdtype, device="meta")
            continue
        t = pool.take(skey)
        if grow:
            # tied weights: a zero row would zero the image token's (unused) embedding: harmless
            t = _fit_rows(t, want[0], key=key, mean_fill=(key == EMBED and not config.tie_word_embeddings))
        p.data = t.to(tdtype).contiguous()
    for key, p in synth:
        p.data = torch.full(tuple(p.shape), _SYNTH_IDENTITY[key], dtype=tdtype, device="meta" if meta else "cpu")
    if synth:
        notes.append("vision post_layernorm synthesized as identity (weight 1, bias 0): the source has none and the "
                     "selected hidden state is taken before it, so it never runs — not a source tensor")
    if plan.tied_lm_head_source is not None:
        pool, skey = plan.tied_lm_head_source
        if not meta and not torch.equal(pool.read(skey), pool.read(plan.source_of(EMBED)[1])):
            raise CheckpointError(f"{pool.label}: tie_word_embeddings is set but {skey} differs from the embeddings")
        pool.discard([skey], "duplicate of the tied input embeddings")
    if not meta:
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
        # buffers (rotary inv_freq, position ids) stay as constructed (fp32 / int64), as from_pretrained keeps them
    for pool in plan.pools:
        pool.check_all_consumed()
    for pool in plan.pools:
        for reason, names in pool.discarded().items():
            notes.append(f"consumed unused from {pool.label}: {_list_preview(names, 6)} — {reason}")
    model.eval()

    tname = template or plan.template_name
    tok = with_image_token(tok, image_id)
    files = {}
    if hash_files:
        for pool in plan.pools:
            prefix = "" if pool.folder == plan.path else f"{pool.folder.name}/"
            files.update({prefix + k: v for k, v in pool.file_hashes().items()})
    source = SourceInfo(format=plan.fmt, path=str(plan.path), files=files, text_backbone=plan.text_backbone,
                        dtype=plan.pools[0].main_dtype(), vision_weights=plan.vision_weights,
                        vision_tower=plan.vision_tower, name=plan.name or plan.path.name,
                        notes=notes)
    return LoadedModel(model=model, tokenizer=tok, image_spec=plan.image_spec, template=template_for(tname),
                       image_token_id=image_id, num_image_tokens=plan.num_image_tokens,
                       eos_token_ids=sp["eos_token_ids"], bos_token_id=sp["bos_token_id"],
                       pad_token_id=sp["pad_token_id"], source=source)
