"""Random-weight checkpoints with real (or tiny) TinyLLaVA configurations, in any source format.

``tinyllava-1.5b`` is the real TinyLLaVA-1.5B / TinyLLaVA-Med architecture (TinyLlama-1.1B +
SigLIP-so400m-384 + mlp2x_gelu) and serves as the scale fixture for benchmarks. Tensors are
produced one at a time from a seeded generator and streamed into fp16 shards, so the full model
never exists in memory (let alone in fp32). The tiny presets are the test fixtures.

Each format gets what a real checkpoint of that format contains:

* legacy: the tower with its last layer already deleted, post_layernorm, no head (+ optionally a
  tower copy folder with all layers, as the hub repo has them);
* factory: the full tower (all layers, post_layernorm, head), ``vision_feature_layer -2``, ``patch``;
* hf: ``save_pretrained`` key layout, ``<image>`` already in the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medlite.checkpoints.shards import ShardWriter
from medlite.checkpoints.writers import (factory_config, legacy_config, preprocessor_dict, source_key, vision_dict,
                                         write_medlite_json, write_tokenizer_files)
from medlite.errors import CheckpointError
from medlite.preprocess import ImageSpec


@dataclass(frozen=True)
class Preset:
    """A model configuration: text backbone fields, the vision tower *as released*, tokenizer size."""

    name: str
    backbone: str
    text: dict
    vision: dict            # full tower (legacy keeps num_hidden_layers - 1 of it)
    tokenizer_size: int
    std: float              # init scale: tiny models use a large one so mapping mistakes show in logits
    vision_repo: str
    template: str
    notes: str = ""
    extra: dict = field(default_factory=dict)


_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
           "patch_size": 14, "image_size": 384, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                "patch_size": 7, "image_size": 28, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 512}

PRESETS: dict[str, Preset] = {
    "tinyllava-1.5b": Preset(
        "tinyllava-1.5b", "llama",
        {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "max_position_embeddings": 2048, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 0},
        _SO400M, 32000, 0.02, "google/siglip-so400m-patch14-384", "vicuna_v1",
        "TinyLLaVA-1.5B / TinyLLaVA-Med: TinyLlama-1.1B + SigLIP-so400m-384 (26 of 27 layers) + mlp2x_gelu"),
    "tiny": Preset("tiny", "llama", {**_TINY_TEXT, "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
                                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                   _TINY_VISION, 512, 0.15, "medlite-random/siglip-tiny-patch7-28", "vicuna_v1"),
    "tiny-phi": Preset("tiny-phi", "phi", {**_TINY_TEXT, "vocab_size": 520, "partial_rotary_factor": 0.5,
                                           "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "bos_token_id": 0,
                                           "eos_token_id": 0},
                       _TINY_VISION, 512, 0.15, "medlite-random/siglip-tiny-patch7-28", "phi",
                       "embedding rows (520) exceed the tokenizer (512) as in Phi-2 (51200 vs 50295); lm_head bias"),
    "tiny-qwen2": Preset("tiny-qwen2", "qwen2", {**_TINY_TEXT, "num_key_value_heads": 2, "vocab_size": 512,
                                                 "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                                                 "eos_token_id": 0, "pad_token_id": 0},
                         _TINY_VISION, 512, 0.15, "medlite-random/siglip-tiny-patch7-28", "qwen2_base",
                         "tied input/output embeddings as in Qwen2-0.5B"),
    "tiny-stablelm": Preset("tiny-stablelm", "stablelm", {**_TINY_TEXT, "num_key_value_heads": 4, "vocab_size": 512,
                                                          "partial_rotary_factor": 0.25, "use_qkv_bias": True,
                                                          "layer_norm_eps": 1e-5, "eos_token_id": 0},
                            _TINY_VISION, 512, 0.15, "medlite-random/siglip-tiny-patch7-28", "phi"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


# -- tokenizer -------------------------------------------------------------------------------------
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_CHARS = _LETTERS + _LETTERS.upper() + "0123456789" + ".,?!:;'\"()-/%+=<>[]{}#&*@_|~`$^\\"


def build_tokenizer(size: int, *, backbone: str = "llama"):
    """A deterministic SentencePiece-style BPE tokenizer (byte fallback, ``▁`` word marker) of ``size`` tokens.

    Built offline without training: merges grow tokens letter by letter in English letter-frequency
    order, which is a valid BPE (every merge joins two existing tokens). Llama backbones get
    ``<unk> <s> </s>``; the others ``<|endoftext|>``, as their real tokenizers do.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    specials = ["<unk>", "<s>", "</s>"] if backbone == "llama" else ["<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in specials + [f"<0x{i:02X}>" for i in range(256)] + ["▁"] + list(_CHARS):
        vocab.setdefault(t, len(vocab))
    if len(vocab) > size:
        raise CheckpointError(f"tokenizer size {size} is below the {len(vocab)} base tokens")
    merges: list[tuple[str, str]] = []
    frontier = ["▁"] + list(_LETTERS)
    while len(vocab) < size and frontier:
        nxt = []
        for t in frontier:
            for c in _LETTERS:
                if len(vocab) >= size:
                    break
                new = t + c
                if new not in vocab:
                    vocab[new] = len(vocab)
                    merges.append((t, c))
                    nxt.append(new)
        frontier = nxt
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=specials[0] if backbone == "llama" else None,
                        fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return tok


# -- tensors ---------------------------------------------------------------------------------------
def preset_configs(p: Preset, *, vocab: Optional[int] = None):
    """(text config, full SigLIP vision config with head) for a preset."""
    from transformers import SiglipVisionConfig

    from medlite.checkpoints.textmodels import text_config_from_dict

    text = text_config_from_dict({**p.text, **({"vocab_size": vocab} if vocab else {})}, p.backbone)
    vision = SiglipVisionConfig(**p.vision, vision_use_head=True)
    return text, vision


def canonical_layout(text, vision) -> list[tuple[str, tuple[int, ...]]]:
    """Canonical names and shapes (text model, projector, full vision tower with head), in order."""
    import torch
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text)
        vm = SiglipVisionModel(vision)
    out = [("model.vision_tower." + k, tuple(v.shape)) for k, v in vm.state_dict().items()]
    h, hv = text.hidden_size, vision.hidden_size
    out += [("model.multi_modal_projector.linear_1.weight", (h, hv)), ("model.multi_modal_projector.linear_1.bias", (h,)),
            ("model.multi_modal_projector.linear_2.weight", (h, h)), ("model.multi_modal_projector.linear_2.bias", (h,))]
    for k, v in lm.state_dict().items():
        if k == "lm_head.weight" and text.tie_word_embeddings:
            continue
        out.append(("model.language_model." + k[len("model."):] if k.startswith("model.") else k, tuple(v.shape)))
    return out


def _random(name: str, shape, gen, std: float):
    import torch

    leaf = name.rsplit(".", 2)
    is_norm = any(s in name for s in ("norm", "layernorm", "layer_norm"))
    if is_norm and name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("bias") or leaf[-1] == "probe":
        return 0.5 * std * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


def _keep(key: str, fmt: str, *, used_layers: int) -> bool:
    """Which canonical tensors a real checkpoint of ``fmt`` stores (the tower is the released one)."""
    if not key.startswith("model.vision_tower."):
        return True
    rest = key[len("model.vision_tower."):]
    if fmt == "factory":
        return True
    if rest.startswith("head."):
        return False
    if rest.startswith("encoder.layers."):
        return int(rest.split(".")[2]) < used_layers
    return True


def write_random_checkpoint(preset: str, out_dir, *, fmt: str = "legacy", seed: int = 0, ctx=None,
                            max_shard_bytes: Optional[int] = 1 << 30, tower_copy: Optional[bool] = None) -> Path:
    """Write a random-weight checkpoint of ``preset`` in ``fmt`` to ``out_dir`` (fp16, streamed).

    ``tower_copy`` (default: for tiny presets, whose tower is no well-known hub repo) also writes
    ``out_dir/vision_tower/`` — the full tower as its repo would hold it — for ``--vision-tower``.
    """
    import torch

    p = get_preset(preset)
    if fmt not in ("legacy", "factory", "hf"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r} (legacy | factory | hf)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(p.tokenizer_size, backbone=p.backbone)
    rows = int(p.text["vocab_size"])
    if fmt == "hf":  # HF Llava checkpoints carry <image> in the vocabulary already
        from medlite.checkpoints.tokenizer import with_image_token

        tok = with_image_token(tok, rows)
        rows += 1
    text, vision = preset_configs(p, vocab=rows)
    total_layers = vision.num_hidden_layers
    used = total_layers - 1 if fmt == "legacy" else total_layers  # legacy: TinyLLaVA deleted the last layer
    layout = canonical_layout(text, vision)
    if tower_copy is None:
        tower_copy = fmt == "legacy" and p.name != "tinyllava-1.5b"
    ckpt_items = [(k, s) for k, s in layout if _keep(k, fmt, used_layers=used)]
    ck = ShardWriter(out, [(source_key(k, fmt), s) for k, s in ckpt_items], dtype_name="float16",
                     max_shard_bytes=max_shard_bytes)
    tw = None
    if tower_copy:
        (out / "vision_tower").mkdir(exist_ok=True)
        tw = ShardWriter(out / "vision_tower", [(source_key(k, "tower"), s) for k, s in layout
                                                if k.startswith("model.vision_tower.")], dtype_name="float16")
    keep = {k for k, _ in ckpt_items}
    gen = torch.Generator().manual_seed(seed)
    for k, shape in layout:
        t = _random(k, shape, gen, p.std).to(torch.float16)
        if k in keep:
            ck.add(source_key(k, fmt), t)
        if tw is not None and k.startswith("model.vision_tower."):
            tw.add(source_key(k, "tower"), t)
        del t
    ck.close()
    spec = ImageSpec(size=vision.image_size, pad_to_square=True)
    vfull = vision_dict(vision, layers=total_layers, head=True)
    if fmt == "legacy":
        conf = legacy_config(text, p.backbone, vision_hidden=vision.hidden_size, vision_tower_repo=p.vision_repo,
                             pad=True)
    elif fmt == "factory":
        from medlite.checkpoints.textmodels import llm_hub_id_for

        conf = factory_config(text, p.backbone, vfull, vision_repo=p.vision_repo,
                              llm_repo=llm_hub_id_for(p.backbone) or "", feature_layer=-2, strategy="patch", pad=True)
        (out / "preprocessor_config.json").write_text(_json(preprocessor_dict(spec)))
    else:
        from transformers import LlavaConfig

        from medlite.checkpoints.writers import text_dict

        conf = LlavaConfig(vision_config={**vision_dict(vision, layers=total_layers, head=False)},
                           text_config={**text_dict(text), "model_type": p.backbone}, image_token_index=rows - 1,
                           vision_feature_layer=-2, vision_feature_select_strategy="full",
                           projector_hidden_act="gelu", image_seq_length=(vision.image_size // vision.patch_size) ** 2,
                           tie_word_embeddings=bool(text.tie_word_embeddings)).to_dict()
        (out / "preprocessor_config.json").write_text(_json(preprocessor_dict(spec)))
    conf["torch_dtype"] = "float16"
    (out / "config.json").write_text(_json(conf))
    llama = p.backbone == "llama"
    eos = [tok.token_to_id("</s>" if llama else "<|endoftext|>")]
    write_tokenizer_files(out, tok, bos=tok.token_to_id("<s>") if llama else None, eos=eos,
                          pad=tok.token_to_id("<unk>") if llama else eos[0], add_bos=llama)
    if fmt == "hf":
        write_medlite_json(out, format=fmt, template=p.template, image_spec=spec.to_dict(),
                           random_preset=p.name, seed=seed)
    if tw is not None:
        tw.close()
        (out / "vision_tower" / "config.json").write_text(_json(vfull))
        (out / "vision_tower" / "preprocessor_config.json").write_text(_json(preprocessor_dict(spec)))
    return out


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=2, default=str)
