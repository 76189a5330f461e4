"""Test models for the export/runtime tests.

* :func:`checkpoint_model`: a random tiny checkpoint written by ``medlite.checkpoints`` in a source
  format and loaded with ``load_model`` — what users' models go through (the main fixture).
* :func:`tiny_loaded`: a LoadedModel built directly with transformers, for variants the presets
  do not have (``hidden_states[-2]`` feature selection). Shapes: SigLIP 28 px / patch 14 → 4 image tokens (hidden 32, 2 layers) with the mlp2x_gelu
projector, Llama hidden 64, 2 layers, 4 heads / 2 KV heads, vocabulary 120 whose last id is
``<image>`` (its lm_head row is zero, as the canonical model's). The tokenizer is a WordLevel
``tokenizers.Tokenizer`` over the words of the vicuna template plus a few answers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medlite.checkpoints.model import LoadedModel, SourceInfo
from medlite.preprocess import ImageSpec
from medlite.prompting import TEMPLATES

VOCAB = 120
IMAGE_ID = VOCAB - 1
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = ("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
         "helpful , detailed , and polite answers to the user's questions USER ASSISTANT : ? yes no left right "
         "is there a lesion in the image which organ lung liver brain heart kidney ct mri x-ray normal "
         "abnormal what modality shows this fracture mass effusion pneumonia").split()


def tiny_tokenizer():
    """WordLevel tokenizer: specials 0-3, template/answer words, fillers, ``<image>`` = 119."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < IMAGE_ID:
        vocab[f"w{i}"] = len(vocab)
        i += 1
    vocab["<image>"] = IMAGE_ID
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS[:3] + ["<image>"]])
    return tok


def tiny_llava(*, tie: bool = False, feature_layer: int = -1, strategy: str = "full", seed: int = 0):
    """A random tiny ``LlavaForConditionalGeneration`` in eval mode (fp32)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID, projector_hidden_act="gelu",
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                      tie_word_embeddings=tie)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Random init gives tiny logits; scale up so greedy decoding is far from ties.
        for p in model.model.language_model.parameters():
            p.mul_(4.0)
        if not tie:
            model.lm_head.weight.mul_(4.0)
            model.lm_head.weight[IMAGE_ID].zero_()
    return model


def tiny_loaded(**kw) -> LoadedModel:
    """The tiny model wrapped as a LoadedModel (SigLIP-style preprocessing, vicuna_v1 template)."""
    model = tiny_llava(**kw)
    n_img = 4 - (1 if kw.get("strategy") == "default" else 0)
    return LoadedModel(
        model=model, tokenizer=tiny_tokenizer(),
        image_spec=ImageSpec(size=28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad_to_square=True),
        template=TEMPLATES["vicuna_v1"], image_token_id=IMAGE_ID, num_image_tokens=n_img, eos_token_ids=[2],
        bos_token_id=1, pad_token_id=3,
        source=SourceInfo(format="hf", path="tiny", name="tiny", notes=["built in tests/export/export_tiny_model.py"]))


def hf_inputs(loaded, image, question: str):
    """(input_ids [1, n] with <image> expanded, pixel_values [1,3,S,S]) as torch tensors."""
    from medlite.preprocess import preprocess
    from medlite.prompting import encode_prompt, expand_image_tokens

    ids = encode_prompt(loaded.tokenizer, loaded.template.render(question), image_token_id=loaded.image_token_id,
                        bos_token_id=loaded.bos_token_id)
    ids = expand_image_tokens(ids, loaded.image_token_id, loaded.num_image_tokens)
    return torch.tensor([ids]), torch.from_numpy(preprocess([image], loaded.image_spec))


@torch.no_grad()
def hf_greedy(loaded, image, question: str, max_new_tokens: int = 12) -> list[int]:
    """Reference greedy ids: transformers' full forward (no cache) per step, image token suppressed."""
    ids, pv = hf_inputs(loaded, image, question)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = loaded.model(input_ids=ids, pixel_values=pv).logits[0, -1].clone()
        logits[loaded.image_token_id] = -float("inf")
        t = int(logits.argmax())
        if t in loaded.eos_token_ids:
            break
        out.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


def random_image(seed: int, size=(40, 30)):
    """A random RGB PIL image (non-square, so padding to square is exercised)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def checkpoint_model(preset: str, fmt: str, root: Path, ctx, **load_kw):
    """``medlite.checkpoints``' random ``preset`` written as ``fmt`` under ``root`` and loaded (fp32)."""
    from medlite.checkpoints import load_model
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    path = write_random_checkpoint(preset, Path(root) / f"{preset}-{fmt}", fmt=fmt, ctx=ctx)
    return load_model(path, ctx=ctx, **load_kw)


def dims(loaded) -> dict:
    """hidden, layers, kv heads, head dim, vocab rows of a loaded model (for building test inputs)."""
    tc = loaded.model.config.text_config
    return {"hidden": tc.hidden_size, "layers": tc.num_hidden_layers,
            "kv": getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
            "hd": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
            "vocab": loaded.model.lm_head.weight.shape[0]}
