"""Random presets and writers: real configurations, determinism, shards, format round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medlite.checkpoints import load_model, write_checkpoint
from medlite.checkpoints.generate import first_token_logits
from medlite.checkpoints.random_ckpt import PRESETS, build_tokenizer, canonical_layout, preset_configs


def _count(layout, pred):
    n = 0
    for k, shape in layout:
        if pred(k):
            c = 1
            for s in shape:
                c *= s
            n += c
    return n


def test_tinyllava_15b_preset_is_the_real_architecture():
    """TinyLlama-1.1B + SigLIP-so400m-384: counts from the meta-device layout (nothing allocated)."""
    p = PRESETS["tinyllava-1.5b"]
    text, vision = preset_configs(p)
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (2048, 22, 5632)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (32, 4, 32000)
    assert text.rms_norm_eps == 1e-5 and text.rope_parameters["rope_theta"] == 10000.0
    assert (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads) == (1152, 4304, 16)
    assert (vision.patch_size, vision.image_size, vision.num_hidden_layers) == (14, 384, 27)
    layout = canonical_layout(text, vision)
    llm = _count(layout, lambda k: k.startswith(("model.language_model.", "lm_head.")))
    assert llm == 1_100_048_384  # TinyLlama-1.1B exactly
    kept = _count(layout, lambda k: k.startswith("model.vision_tower.") and ".head." not in k
                  and not k.startswith("model.vision_tower.encoder.layers.26."))
    assert 0.39e9 < kept < 0.40e9  # 26 of 27 SigLIP layers
    proj = _count(layout, lambda k: "multi_modal_projector" in k)
    assert proj == 1152 * 2048 + 2048 + 2048 * 2048 + 2048


def test_tokenizer_builder():
    tok = build_tokenizer(32000)
    assert tok.get_vocab_size() == 32000
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>")] == [0, 1, 2, 3]
    enc = tok.encode("Is there a fracture?", add_special_tokens=False)
    assert tok.decode(enc.ids) == "Is there a fracture?"
    assert build_tokenizer(32000).to_str() == tok.to_str()  # deterministic
    assert build_tokenizer(600, backbone="phi").token_to_id("<|endoftext|>") == 0


def test_random_checkpoint_is_deterministic(tmp_path):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    a = write_random_checkpoint("tiny", tmp_path / "a", fmt="factory", seed=3)
    b = write_random_checkpoint("tiny", tmp_path / "b", fmt="factory", seed=3)
    c = write_random_checkpoint("tiny", tmp_path / "c", fmt="factory", seed=4)
    ra, rb, rc = ((d / "model.safetensors").read_bytes() for d in (a, b, c))
    assert ra == rb and ra != rc


def test_random_shards_respect_the_limit(tmp_path):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    d = write_random_checkpoint("tiny", tmp_path / "s", fmt="legacy", max_shard_bytes=50_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    # a shard exceeds the limit only when a single tensor does (the embedding: 512×64 fp16 = 64 KiB)
    from medlite.checkpoints.pool import read_safetensors_header

    for s in shards:
        header = read_safetensors_header(d / s)
        data = sum(2 * int(np.prod(shape)) for _, shape in header.values())
        assert data <= 50_000 or len(header) == 1
    # real legacy key names
    keys = set(index["weight_map"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight",
            "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"} <= keys
    assert not any(".encoder.layers.2." in k or ".head." in k for k in keys)  # deleted by TinyLLaVA
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["image_aspect_ratio"] == "pad"
    assert cfg["model_type"] == "tiny_llava" and "mm_vision_tower" in cfg


@pytest.mark.parametrize("fmt", ["factory", "hf", "legacy"])
def test_write_checkpoint_round_trip(fmt, random_ckpt, ctx, photo, tmp_path):
    """canonical → write(fmt) → load gives the same logits (fp32 on disk, so exactly the same weights)."""
    import torch

    base = load_model(random_ckpt("tiny-qwen2", "legacy"), ctx=ctx)
    out = tmp_path / fmt
    write_checkpoint(base.model, base.tokenizer, out, fmt=fmt, image_spec=base.image_spec, template_name="qwen2_base",
                     text_backbone="qwen2", dtype=torch.float32, vision_tower_repo="medlite-random/siglip-tiny",
                     vision_tower_copy_dir=(out / "vision_tower") if fmt == "legacy" else None)
    again = load_model(out, ctx=ctx)
    assert again.source.format == fmt and again.template.name == "qwen2_base"
    assert again.image_token_id == base.image_token_id and again.num_image_tokens == base.num_image_tokens
    q = "Is the liver enlarged?"
    np.testing.assert_allclose(first_token_logits(again, photo, q), first_token_logits(base, photo, q), atol=1e-6)


def test_factory_model_cannot_be_written_as_legacy(random_ckpt, ctx, tmp_path):
    from medlite.errors import CheckpointError

    base = load_model(random_ckpt("tiny", "factory"), ctx=ctx)
    with pytest.raises(CheckpointError, match="drops the first"):
        write_checkpoint(base.model, base.tokenizer, tmp_path / "x", fmt="legacy", image_spec=base.image_spec,
                         template_name="llama")
