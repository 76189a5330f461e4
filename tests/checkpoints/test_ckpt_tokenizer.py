"""Tokenizers: SentencePiece-only folders are converted; special ids resolved; <image> placed exactly."""
from __future__ import annotations

import json

import pytest

from medlite.checkpoints.tokenizer import (IMAGE_TOKEN, load_tokenizer, special_ids, vocab_end, with_image_token,
                                           without_image_token)
from medlite.errors import CheckpointError

# A hand-made SentencePiece BPE model in the layout of Llama / TinyLlama's tokenizer.model:
# <unk> <s> </s>, 256 byte pieces, then merged pieces with descending scores.
PIECES = ["▁", "t", "h", "e", "c", "a", "▁t", "he", "▁the", "at", "▁c", "▁cat"]


def _write_spm(folder, *, extra_config=None):
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    m = pb.ModelProto()
    for text, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        p = m.pieces.add()
        p.piece, p.type, p.score = text, kind, 0.0
    for i in range(256):
        p = m.pieces.add()
        p.piece, p.type, p.score = f"<0x{i:02X}>", 6, 0.0
    for i, text in enumerate(PIECES):
        p = m.pieces.add()
        p.piece, p.type, p.score = text, 1, -float(i)
    m.trainer_spec.model_type = 2  # BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = 0
    m.normalizer_spec.add_dummy_prefix = True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(m.SerializeToString())
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "legacy": False}
    cfg.update(extra_config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_sentencepiece_conversion(tmp_path):
    _write_spm(tmp_path)
    tok = load_tokenizer(tmp_path)
    # hand-derived: the dummy prefix makes "the" → "▁the"; "cat" after a space → "▁cat"
    assert tok.encode("the cat", add_special_tokens=False).tokens == ["▁the", "▁cat"]
    assert tok.encode("hat", add_special_tokens=False).tokens == ["▁", "h", "at"]
    # unknown characters fall back to UTF-8 bytes, as SentencePiece byte_fallback does
    assert tok.encode("é", add_special_tokens=False).tokens == ["▁", "<0xC3>", "<0xA9>"]
    assert tok.decode(tok.encode("the cat é", add_special_tokens=False).ids) == "the cat é"
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    # control tokens are not split
    assert tok.encode("the</s>", add_special_tokens=False).tokens == ["▁the", "</s>"]


def test_legacy_normalizer_variant(tmp_path):
    _write_spm(tmp_path, extra_config={"legacy": True})
    tok = load_tokenizer(tmp_path)
    assert tok.encode("the cat", add_special_tokens=False).tokens == ["▁the", "▁cat"]


def test_added_tokens_after_the_spm_vocab(tmp_path):
    n = 3 + 256 + len(PIECES)
    _write_spm(tmp_path, extra_config={"pad_token": "<pad>",
                                       "added_tokens_decoder": {str(n): {"content": "<pad>", "special": True}}})
    tok = load_tokenizer(tmp_path)
    assert tok.token_to_id("<pad>") == n and vocab_end(tok) == n + 1
    ids = special_ids(tmp_path, tok, {}, default_add_bos=True)
    assert ids["pad_token_id"] == n and ids["bos_token_id"] == 1 and ids["eos_token_ids"] == [2]


def test_special_ids_sources(tmp_path):
    _write_spm(tmp_path, extra_config={"add_bos_token": False})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = load_tokenizer(tmp_path)
    ids = special_ids(tmp_path, tok, {}, default_add_bos=True)
    assert ids["bos_token_id"] is None and ids["eos_token_ids"] == [2, 5]
    assert ids["pad_token_id"] == 0  # no pad token: <unk>, as LLaVA sets it for Llama


def test_image_token_with_placeholders(tmp_path):
    _write_spm(tmp_path)
    tok = load_tokenizer(tmp_path)
    end = vocab_end(tok)
    t2 = with_image_token(tok, end + 3)
    assert t2.token_to_id(IMAGE_TOKEN) == end + 3
    assert t2.encode("the <image> cat", add_special_tokens=False).ids.count(end + 3) == 1
    assert t2.decode([end, end + 1, end + 2], skip_special_tokens=True) == ""
    assert tok.token_to_id(IMAGE_TOKEN) is None  # the original is untouched
    back = without_image_token(t2)
    assert back.token_to_id(IMAGE_TOKEN) is None and vocab_end(back) == end
    with pytest.raises(CheckpointError, match="more than the"):
        with_image_token(tok, end - 1)


def test_no_tokenizer_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)
