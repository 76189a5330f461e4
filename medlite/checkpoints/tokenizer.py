"""Tokenizers: load (or convert) a checkpoint's tokenizer, resolve its special ids, add ``<image>``.

The canonical tokenizer is a ``tokenizers.Tokenizer`` (fast, torch-free, what the device runtime
uses). ``tokenizer.json`` is used as it is. A folder with only a SentencePiece ``tokenizer.model``
(TinyLlama / LLaVA era) is converted the way transformers' ``LlamaConverter`` does it, reading the
model protobuf with the ``protobuf`` package (no ``sentencepiece`` needed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from medlite.errors import CheckpointError

IMAGE_TOKEN = "<image>"
FILLER = "<medlite_unused_{}>"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _token_str(v) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def convert_sentencepiece(model_file: Path, tokenizer_config: dict):
    """SentencePiece ``tokenizer.model`` → ``tokenizers.Tokenizer`` (Llama conventions, byte fallback)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{model_file}: not a SentencePiece model ({e})") from None
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if not pieces:
        raise CheckpointError(f"{model_file}: SentencePiece model has no pieces")
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    unk_id = proto.trainer_spec.unk_id
    if proto.trainer_spec.model_type == 1:  # UNIGRAM
        tok = Tokenizer(Unigram(pieces, unk_id=unk_id, byte_fallback=byte_fallback))
    else:  # BPE: merges ordered by the score of the merged piece, as SentencePiece applies them
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        merges = generate_merges(vocab, {p: s for p, s in pieces})
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id][0], fuse_unk=True,
                            byte_fallback=byte_fallback, dropout=None))
    legacy = tokenizer_config.get("legacy", True)
    add_prefix = tokenizer_config.get("add_prefix_space", True) is not False
    if legacy:
        seq = ([normalizers.Prepend("▁")] if add_prefix else []) + [normalizers.Replace(" ", "▁")]
        tok.normalizer = normalizers.Sequence(seq)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix else "never",
                                                     split=False)
    dec = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if byte_fallback else []) + [decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    # control (3) and unknown (2) pieces are special; user-defined (4) ones must not be split
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                            for p in proto.pieces if p.type in (2, 3)])
    user = [AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4]
    if user:
        tok.add_tokens(user)
    return tok


def _extra_added_tokens(tok, tokenizer_config: dict, where: Path) -> None:
    """Tokens that ``added_tokens_decoder`` places after the SentencePiece vocabulary (e.g. ``<pad>``)."""
    from tokenizers import AddedToken

    extra = tokenizer_config.get("added_tokens_decoder") or {}
    for sid, info in sorted(extra.items(), key=lambda kv: int(kv[0])):
        content = info.get("content")
        if content is None or tok.token_to_id(content) is not None:
            continue
        want = int(sid)
        got = tok.get_vocab_size(with_added_tokens=True)
        if want != got:
            raise CheckpointError(f"{where}: added token {content!r} has id {want} but the vocabulary ends at {got}")
        tok.add_special_tokens([AddedToken(content, normalized=False, special=bool(info.get("special", True)))])


def load_tokenizer(folder: Path):
    """The folder's tokenizer as a ``tokenizers.Tokenizer`` (tokenizer.json, else tokenizer.model)."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    tj, sp = folder / "tokenizer.json", folder / "tokenizer.model"
    if tj.is_file():
        try:
            return Tokenizer.from_file(str(tj))
        except Exception as e:
            raise CheckpointError(f"{tj}: cannot load tokenizer ({e})") from None
    if sp.is_file():
        cfg = _read_json(folder / "tokenizer_config.json")
        tok = convert_sentencepiece(sp, cfg)
        _extra_added_tokens(tok, cfg, folder / "tokenizer_config.json")
        return tok
    raise CheckpointError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model) — a checkpoint folder must "
                          f"carry its tokenizer")


def vocab_end(tok) -> int:
    """One past the largest token id the tokenizer can produce."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def special_ids(folder: Path, tok, config: dict, *, default_add_bos: bool) -> dict:
    """bos / eos / pad ids from tokenizer_config.json, special_tokens_map.json, generation_config.json, config.json."""
    folder = Path(folder)
    tcfg = _read_json(folder / "tokenizer_config.json")
    smap = _read_json(folder / "special_tokens_map.json")
    gen = _read_json(folder / "generation_config.json")
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def tid(name: str) -> Optional[int]:
        s = _token_str(tcfg.get(name)) or _token_str(smap.get(name))
        return tok.token_to_id(s) if s else None

    def ids(v) -> list[int]:
        return [] if v is None else [int(x) for x in (v if isinstance(v, list) else [v])]

    eos = []
    for cand in ([tid("eos_token")] + ids(gen.get("eos_token_id"))):
        if cand is not None and cand not in eos:
            eos.append(cand)
    if not eos:
        eos = ids(config.get("eos_token_id")) or ids(text_cfg.get("eos_token_id"))
    if not eos:
        raise CheckpointError(f"{folder}: no end-of-sequence token in tokenizer_config.json, special_tokens_map.json, "
                              f"generation_config.json or config.json")
    bos = tid("bos_token")
    if bos is None:
        b = gen.get("bos_token_id", config.get("bos_token_id", text_cfg.get("bos_token_id")))
        bos = int(b) if isinstance(b, int) else None
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
        add_bos = default_add_bos
    pad = tid("pad_token")
    if pad is None:
        p = gen.get("pad_token_id", config.get("pad_token_id", text_cfg.get("pad_token_id")))
        pad = int(p) if isinstance(p, int) else (tid("unk_token") if tid("unk_token") is not None else eos[0])
    return {"bos_token_id": bos if add_bos else None, "eos_token_ids": eos, "pad_token_id": pad,
            "add_bos": bool(add_bos), "bos_token": bos}


def with_image_token(tok, image_token_id: int):
    """A copy of ``tok`` with ``<image>`` as a special token at exactly ``image_token_id``.

    ``tokenizers`` numbers added tokens consecutively, so ids between the tokenizer's end and the
    embedding matrix's end (Phi-2: 50295..51199) get placeholder tokens first.
    """
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tok.to_str())
    existing = tok.token_to_id(IMAGE_TOKEN)
    if existing is not None:
        if existing != image_token_id:
            raise CheckpointError(f"tokenizer already has {IMAGE_TOKEN!r} at id {existing}, expected {image_token_id}")
        return tok
    end = vocab_end(tok)
    if end > image_token_id:
        raise CheckpointError(f"tokenizer has {end} tokens, more than the {image_token_id} embedding rows")
    fillers = [AddedToken(FILLER.format(i), normalized=False, special=True) for i in range(end, image_token_id)]
    if fillers:
        tok.add_special_tokens(fillers)
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    got = tok.token_to_id(IMAGE_TOKEN)
    if got != image_token_id:
        raise CheckpointError(f"could not place {IMAGE_TOKEN!r} at id {image_token_id} (got {got})")
    return tok


def without_image_token(tok):
    """A copy of ``tok`` without ``<image>`` (and medlite placeholders), for writing source formats."""
    from tokenizers import Tokenizer

    d = json.loads(tok.to_str())
    d["added_tokens"] = [t for t in d.get("added_tokens", [])
                         if t["content"] != IMAGE_TOKEN and not t["content"].startswith("<medlite_unused_")]
    return Tokenizer.from_str(json.dumps(d))
