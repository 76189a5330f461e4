"""Write a canonical model back out as a legacy TinyLLaVA, TinyLLaVA Factory or HF Llava checkpoint.

Key names and config fields are the real ones of each format (see docs/checkpoints.md), so the
written folders exercise exactly the loader paths a user's checkpoint takes. Used for the built-in
demo model (legacy format), the random scale fixtures and the tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from medlite.checkpoints.shards import ShardWriter
from medlite.errors import CheckpointError

# canonical prefix -> source prefix, per format (longest prefix wins)
KEYMAP = {
    "legacy": [("model.language_model.", "model."), ("lm_head.", "lm_head."),
               ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
               ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")],
    "factory": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.multi_modal_projector.linear_1.", "connector._connector.0."),
                ("model.multi_modal_projector.linear_2.", "connector._connector.2."),
                ("model.vision_tower.", "vision_tower._vision_tower.vision_model.")],
    # what LlavaForConditionalGeneration.save_pretrained writes in transformers 5.17
    "hf": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
           ("model.multi_modal_projector.", "multi_modal_projector."), ("model.vision_tower.", "vision_tower.")],
    "tower": [("model.vision_tower.", "vision_model.")],
}
LEGACY_MODEL_TYPES = {"llama": ("tiny_llava", "TinyLlavaLlamaForCausalLM"),
                      "phi": ("tiny_llava_phi", "TinyLlavaPhiForCausalLM"),
                      "stablelm": ("tiny_llava_stablelm", "TinyLlavaStablelmForCausalLM"),
                      "qwen2": ("tiny_llava_qwen", "TinyLlavaQwenForCausalLM")}


def source_key(key: str, fmt: str) -> Optional[str]:
    """The name a canonical parameter has in ``fmt`` (None: not stored in that format)."""
    best = None
    for c, s in KEYMAP[fmt]:
        if key.startswith(c) and (best is None or len(c) > len(best[0])):
            best = (c, s)
    return None if best is None else best[1] + key[len(best[0]):]


def text_dict(text_config) -> dict:
    """A text config as the original (transformers 4.x era) code wrote it: rope_theta, not rope_parameters."""
    d = text_config.to_dict()
    rp = d.pop("rope_parameters", None) or {}
    if rp.get("rope_theta") is not None:
        d["rope_theta"] = rp["rope_theta"]
    if rp.get("partial_rotary_factor") is not None:
        d["partial_rotary_factor"] = rp["partial_rotary_factor"]
    if rp.get("rope_type", "default") != "default":
        d["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    for k in ("dtype", "transformers_version", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
              "is_encoder_decoder", "id2label", "label2id", "problem_type", "architectures"):
        d.pop(k, None)
    return d


def preprocessor_dict(spec) -> dict:
    """A SigLIP ``preprocessor_config.json`` equivalent to ``spec`` (padding is a model-config matter)."""
    if spec.resize_mode != "exact":
        raise CheckpointError("only SigLIP-style (exact resize) preprocessing can be written")
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}[spec.resample]
    return {"do_resize": True, "size": {"height": spec.size, "width": spec.size}, "resample": resample,
            "do_rescale": True, "rescale_factor": spec.rescale, "do_normalize": True,
            "image_mean": list(spec.mean), "image_std": list(spec.std), "do_convert_rgb": True,
            "image_processor_type": "SiglipImageProcessor"}


def vision_dict(vcfg, *, layers: int, head: bool) -> dict:
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "image_size", "patch_size",
            "hidden_act", "layer_norm_eps", "attention_dropout")
    d = {k: getattr(vcfg, k) for k in keep}
    d.update(model_type="siglip_vision_model", num_hidden_layers=layers, vision_use_head=head)
    return d


def write_tokenizer_files(out: Path, tok, *, bos: Optional[int], eos: list[int], pad: Optional[int],
                          add_bos: bool, max_length: int = 2048) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json + generation_config.json."""
    name = tok.id_to_token
    tok.save(str(out / "tokenizer.json"))
    smap = {}
    if bos is not None:
        smap["bos_token"] = name(bos)
    smap["eos_token"] = name(eos[0])
    if pad is not None:
        smap["pad_token"] = name(pad)
    if tok.token_to_id("<unk>") is not None:
        smap["unk_token"] = "<unk>"
    tcfg = {**smap, "add_bos_token": add_bos, "add_eos_token": False, "legacy": False,
            "model_max_length": max_length, "padding_side": "right", "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2))
    gen = {"bos_token_id": bos, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def legacy_config(text_config, backbone: str, *, vision_hidden: int, vision_tower_repo: str, pad: bool) -> dict:
    mt, arch = LEGACY_MODEL_TYPES[backbone]
    d = text_dict(text_config)
    d.update(model_type=mt, architectures=[arch], mm_vision_tower=vision_tower_repo, mm_hidden_size=vision_hidden,
             mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
             mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False,
             image_aspect_ratio="pad" if pad else "square", use_mm_proj=True, tokenizer_padding_side="right",
             tokenizer_model_max_length=2048, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
             torch_dtype="float16")
    return d


def factory_config(text_config, backbone: str, vision: dict, *, vision_repo: str, llm_repo: str,
                   feature_layer: int, strategy: str, pad: bool) -> dict:
    return {"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"],
            "llm_model_name_or_path": llm_repo, "tokenizer_name_or_path": llm_repo,
            "vision_model_name_or_path": vision_repo, "vision_model_name_or_path2": "",
            "connector_type": "mlp2x_gelu", "text_config": {**text_dict(text_config), "model_type": backbone},
            "vision_config": vision, "hidden_size": text_config.hidden_size, "vocab_size": text_config.vocab_size,
            "vision_hidden_size": vision["hidden_size"], "vision_feature_layer": feature_layer,
            "vision_feature_select_strategy": strategy, "image_aspect_ratio": "pad" if pad else "square",
            "ignore_index": -100, "image_token_index": -200, "pad_token": None, "tokenizer_padding_side": "right",
            "tokenizer_model_max_length": 2048, "tokenizer_use_fast": False, "use_cache": True,
            "tune_type_llm": "full", "tune_type_connector": "full", "tune_type_vision_tower": "frozen"}


def write_medlite_json(out: Path, **fields) -> None:
    (out / "medlite_source.json").write_text(json.dumps({"written_by": "medlite.checkpoints.writers", **fields},
                                                        indent=2, default=str))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_checkpoint(model, tokenizer, out_dir, *, fmt: str = "legacy", image_spec, template_name: str,
                     text_backbone: str = "llama", dtype=None, max_shard_bytes: Optional[int] = None,
                     include_vision: bool = True, vision_tower_repo: str = "google/siglip-so400m-patch14-384",
                     vision_tower_copy_dir=None, name: Optional[str] = None) -> Path:
    """Write a canonical ``LlavaForConditionalGeneration`` + tokenizer in a source format.

    ``legacy`` / ``factory`` drop the appended image-token row (and ``<image>`` from the tokenizer),
    as those formats splice the image at a sentinel id outside the vocabulary. ``legacy`` can also
    write a separate tower copy (``vision_tower_copy_dir``: config.json + preprocessor_config.json +
    weights) for ``--vision-tower``; its config has one layer more than the canonical tower (TinyLLaVA
    deletes the last layer on load), filled with a copy of the last kept layer. bos / eos / pad ids for
    the tokenizer files come from ``model.config.text_config`` (BOS only for Llama backbones). ``name``,
    when given, is recorded in ``medlite_source.json``: loaders use it instead of the folder name
    (a cache folder named by a hash still yields artifacts named for the model).
    """
    import torch

    from medlite.checkpoints.tokenizer import without_image_token

    if fmt not in ("legacy", "factory", "hf"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r} (legacy | factory | hf)")
    dtype = dtype or torch.float16
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    if cfg.vision_feature_layer != -1:
        raise CheckpointError("write_checkpoint expects a canonical model (vision_feature_layer -1)")
    tied = bool(cfg.tie_word_embeddings)
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    rows = state["model.language_model.embed_tokens.weight"].shape[0]
    image_id = int(cfg.image_token_id)
    tok = tokenizer
    text = tcfg.__class__.from_dict(tcfg.to_dict())
    if fmt in ("legacy", "factory") and image_id == rows - 1:
        for k in ("model.language_model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            if k in state:
                state[k] = state[k][:-1]
        text.vocab_size = rows - 1
        tok = without_image_token(tokenizer)
    if fmt == "legacy" and cfg.vision_feature_select_strategy != "full":
        raise CheckpointError("a legacy TinyLLaVA checkpoint keeps all patch tokens; this model drops the first "
                              "(vision_feature_select_strategy 'default'): write it as factory or hf instead")
    if not include_vision:
        state = {k: v for k, v in state.items() if not k.startswith("model.vision_tower.")}
    names = [(source_key(k, fmt), k) for k in state]
    writer = ShardWriter(out, [(s, tuple(state[k].shape)) for s, k in names], dtype_name=_dtype_name(dtype),
                         max_shard_bytes=max_shard_bytes)
    for s, k in names:
        writer.add(s, state[k])
    writer.close()

    pad = image_spec.pad_to_square
    if fmt == "legacy":
        conf = legacy_config(text, text_backbone, vision_hidden=vcfg.hidden_size, vision_tower_repo=vision_tower_repo,
                             pad=pad)
    elif fmt == "factory":
        from medlite.checkpoints.textmodels import llm_hub_id_for

        conf = factory_config(text, text_backbone, vision_dict(vcfg, layers=vcfg.num_hidden_layers, head=False),
                              vision_repo=vision_tower_repo, llm_repo=llm_hub_id_for(text_backbone) or "",
                              feature_layer=-1, pad=pad,
                              strategy="patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch")
    else:
        conf = cfg.to_dict()
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(image_spec), indent=2))
    conf["torch_dtype"] = _dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(conf, indent=2, default=str))
    bos, eos, pad = _special_ids(tok, tcfg, text_backbone)
    write_tokenizer_files(out, tok, bos=bos, eos=eos, pad=pad, add_bos=bos is not None)
    extra = {"name": name} if name else {}
    write_medlite_json(out, format=fmt, template=template_name, image_spec=image_spec.to_dict(), **extra)
    if vision_tower_copy_dir is not None:
        write_tower_copy(model, vision_tower_copy_dir, image_spec=image_spec, dtype=dtype)
    return out


def _special_ids(tok, tcfg, backbone: str):
    """bos / eos / pad for the tokenizer files, from ``model.config.text_config`` (validated against ``tok``)."""
    def valid(i):
        return i if isinstance(i, int) and tok.id_to_token(i) is not None else None

    eos = [e for e in (tcfg.eos_token_id if isinstance(tcfg.eos_token_id, list) else [tcfg.eos_token_id])
           if valid(e) is not None]
    if not eos:
        raise CheckpointError(f"model.config.text_config.eos_token_id={tcfg.eos_token_id!r} is not a token of the "
                              f"tokenizer; set it (and bos/pad) to the tokenizer's ids before writing")
    bos = valid(tcfg.bos_token_id) if backbone == "llama" else None
    return bos, eos, valid(tcfg.pad_token_id)


def write_tower_copy(model, out_dir, *, image_spec, dtype) -> Path:
    """A local "vision tower repo" for a legacy checkpoint: N+1 layers (TinyLLaVA deletes the last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vcfg = model.config.vision_config
    n = vcfg.num_hidden_layers
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("model.vision_tower.")}
    last = f"model.vision_tower.encoder.layers.{n - 1}."
    extra = {k.replace(last, f"model.vision_tower.encoder.layers.{n}."): v.clone() for k, v in sd.items()
             if k.startswith(last)}
    sd.update(extra)
    writer = ShardWriter(out, [(source_key(k, "tower"), tuple(v.shape)) for k, v in sd.items()],
                         dtype_name=_dtype_name(dtype))
    for k, v in sd.items():
        writer.add(source_key(k, "tower"), v)
    writer.close()
    (out / "config.json").write_text(json.dumps(vision_dict(vcfg, layers=n + 1, head=False), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(image_spec), indent=2))
    return out
