"""Canonical model outputs equal an independent reference forward of the source checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ckpt_reference import SourceReference
from medlite.checkpoints import load_model
from medlite.checkpoints.generate import first_token_logits, image_embeddings

QUESTION = "Is there a mass in the left lung?"

CASES = [("tiny", "legacy", 16), ("tiny", "factory", 15), ("tiny", "hf", 16),
         ("tiny-phi", "legacy", 16), ("tiny-qwen2", "factory", 15), ("tiny-stablelm", "legacy", 16),
         ("tiny-phi", "hf", 16)]


def _load(folder, fmt, ctx, **kw):
    tower = folder / "vision_tower" if fmt == "legacy" else None
    return load_model(folder, ctx=ctx, vision_tower=tower, **kw)


@pytest.mark.parametrize("preset,fmt,n_tokens", CASES)
def test_first_token_logits_match_reference(preset, fmt, n_tokens, random_ckpt, ctx, photo):
    folder = random_ckpt(preset, fmt)
    loaded = _load(folder, fmt, ctx)
    assert loaded.num_image_tokens == n_tokens
    assert loaded.source.format == fmt
    ref = SourceReference(folder, tower=folder / "vision_tower" if fmt == "legacy" else None)
    prompt = loaded.template.render(QUESTION)
    want = ref.first_token_logits(photo, prompt, bos=loaded.bos_token_id)
    got = first_token_logits(loaded, photo, QUESTION)
    # the canonical vocabulary may have the appended image token (and, for Phi, nothing in between)
    assert got.shape[0] >= want.shape[0]
    np.testing.assert_allclose(got[: want.shape[0]], want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.1, "logits too small for the comparison to mean anything"


@pytest.mark.parametrize("fmt,n_tokens", [("legacy", 16), ("factory", 15)])
def test_image_token_counts_follow_source_semantics(fmt, n_tokens, random_ckpt, ctx, photo):
    """Legacy keeps all 4×4 patches of the cut tower; Factory takes hidden_states[-2] and drops the first."""
    folder = random_ckpt("tiny", fmt)
    loaded = _load(folder, fmt, ctx)
    emb = image_embeddings(loaded, photo)
    assert emb.shape == (n_tokens, loaded.model.config.text_config.hidden_size)
    ref = SourceReference(folder, tower=folder / "vision_tower" if fmt == "legacy" else None)
    from ckpt_reference import reference_pixels

    want = ref.image_features(reference_pixels(photo, 28, pad=True))[0].numpy()
    np.testing.assert_allclose(emb, want, atol=1e-5, rtol=0)
    assert loaded.model.config.vision_config.num_hidden_layers == 2  # 3-layer tower, 2 used in both formats


def test_image_token_row_and_tokenizer(random_ckpt, ctx):
    folder = random_ckpt("tiny-phi", "legacy")
    loaded = _load(folder, "legacy", ctx)
    # Phi-style: 512 tokenizer entries, 520 embedding rows → <image> appended at 520
    assert loaded.image_token_id == 520
    assert loaded.tokenizer.token_to_id("<image>") == 520
    emb = loaded.model.model.language_model.get_input_embeddings().weight
    head = loaded.model.lm_head
    assert emb.shape[0] == head.weight.shape[0] == 521
    assert torch.count_nonzero(head.weight[520]) == 0 and float(head.bias.detach()[520]) == 0.0
    torch.testing.assert_close(emb[520], emb[:520].mean(0))
    assert loaded.model.config.image_token_id == 520
    assert loaded.source.text_backbone == "phi"


def test_hf_current_key_layout(random_ckpt, ctx, photo, tmp_path):
    """HF checkpoints with ``model.language_model.*`` keys (what a 5.x state_dict holds) load too."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    src = random_ckpt("tiny", "hf")
    ref = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    out = tmp_path / "current"
    out.mkdir()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.language_model.embed_tokens.weight" in sd
    save_file(sd, str(out / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            (out / f.name).write_text(f.read_text())
    loaded = load_model(out, ctx=ctx)
    assert any("current" in n for n in loaded.source.notes)
    # reference: transformers' own Llava on the same weights (full 3-layer tower, layer -2)
    from medlite.checkpoints.generate import pixel_values, prompt_ids

    ids = torch.tensor([prompt_ids(loaded, QUESTION)])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixel_values(loaded, photo)).logits[0, -1].numpy()
    np.testing.assert_allclose(first_token_logits(loaded, photo, QUESTION), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sharded_half_precision_sources(dtype, random_ckpt, ctx, photo, tmp_path):
    """A canonical model written as sharded fp16/bf16 legacy checkpoint loads, records its dtype, matches."""
    from medlite.checkpoints import write_checkpoint

    base = _load(random_ckpt("tiny", "legacy"), "legacy", ctx)
    out = tmp_path / "sharded"
    write_checkpoint(base.model, base.tokenizer, out, fmt="legacy", image_spec=base.image_spec,
                     template_name="vicuna_v1", dtype=dtype, max_shard_bytes=60_000,
                     vision_tower_repo="medlite-random/siglip-tiny-patch7-28", vision_tower_copy_dir=out / "tower")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    loaded = load_model(out, ctx=ctx, vision_tower=out / "tower")
    assert loaded.source.dtype == str(dtype).replace("torch.", "")
    assert next(loaded.model.parameters()).dtype == torch.float32
    ref = SourceReference(out, tower=out / "tower")
    want = ref.first_token_logits(photo, loaded.template.render(QUESTION), bos=loaded.bos_token_id)
    got = first_token_logits(loaded, photo, QUESTION)
    np.testing.assert_allclose(got[: want.shape[0]], want, atol=1e-5, rtol=0)
    # and the round trip changed the weights only by the half-precision rounding
    a = base.model.lm_head.weight[:512]
    b = loaded.model.lm_head.weight[:512]
    assert torch.equal(a.to(dtype).float(), b)


def test_dtype_argument(random_ckpt, ctx):
    loaded = _load(random_ckpt("tiny", "factory"), "factory", ctx, dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
