"""The demo model's tokenizer: a small Llama-style BPE trained offline with ``tokenizers``.

Layout follows TinyLlama/Llama's ``tokenizer.json`` so the demo checkpoint exercises the same code
paths as the real one: ids 0-2 are ``<unk>``, ``<s>``, ``</s>``, then ``<pad>`` (TinyLLaVA-Med adds
a pad token to Llama's vocabulary), then the 256 byte-fallback tokens ``<0x00>``..``<0xFF>`` (any
character outside the training corpus still encodes, as with Llama), then the learned pieces.
Words are marked with ``▁`` (SentencePiece's word-start marker) and every encoded chunk gets one in
front, as the legacy Llama tokenizer does.

Training is deterministic: ``tokenizers``' BPE trainer breaks ties by its own ordering of pairs
and the corpus is a fixed, sorted list of strings.
"""
from __future__ import annotations

import json

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
UNK, BOS, EOS, PAD = 0, 1, 2, 3
_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))


def train_demo_tokenizer(corpus: list[str], *, vocab_size: int = 640):
    """Train the BPE on ``corpus`` and return a Llama-style ``tokenizers.Tokenizer``.

    ``vocab_size`` counts everything (specials and byte tokens included); the trainer stops early
    when the corpus has no more pairs to merge, so the result can be smaller.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    reserved = list(SPECIALS) + list(_BYTES)
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    draft = Tokenizer(BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=reserved, min_frequency=2, show_progress=False)
    draft.train_from_iterator(sorted(set(corpus)), trainer=trainer)

    # Rebuild with the byte tokens as ordinary vocabulary entries (not "added" special tokens: in
    # Llama they are pieces, and an added token would match the literal text "<0x41>").
    model = json.loads(draft.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for i, t in enumerate(reserved):
        if vocab.get(t) != i:
            raise RuntimeError(f"BPE trainer placed {t!r} at {vocab.get(t)}, expected {i}")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    return tok


def tokenizer_files(tok) -> dict[str, str]:
    """The transformers-side files next to ``tokenizer.json`` (as TinyLLaVA-Med checkpoints carry)."""
    cfg = {
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "model_max_length": 2048, "padding_side": "right", "clean_up_tokenization_spaces": False,
    }
    smap = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return {"tokenizer_config.json": json.dumps(cfg, indent=2), "special_tokens_map.json": json.dumps(smap, indent=2)}
