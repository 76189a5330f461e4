"""Readers for the medical VQA formats users bring: VQA-RAD, SLAKE, LLaVA-Med / TinyLLaVA-Med.

Torch-free. The format is detected from the records' keys (not the file name):

* VQA-RAD official JSON — ``qid``, ``image_name``, ``image_organ``, ``question``, ``answer``,
  ``answer_type`` (CLOSED/OPEN), ``question_type``, ``phrase_type``. One file holds every split:
  ``test`` = phrase_type test_freeform/test_para, ``train`` = the rest. No modality field.
* SLAKE 1.0 — ``train.json``/``validate.json``/``test.json`` with ``img_id``, ``img_name``,
  ``question``, ``answer``, ``q_lang`` (en/zh), ``answer_type``, ``modality``, ``location``,
  ``content_type``, ``base_type``, ``qid``. One file per split; ``lang`` filters ``q_lang``.
* LLaVA-Med / TinyLLaVA-Med ``test.json`` — ``id``, ``image``, ``answer_type``, ``conversations``
  (human turn "<image>\\n question", gpt turn = answer); predictions come as an answers
  ``.jsonl`` (``question_id``, ``text``) read by :func:`load_answers_jsonl`.

Images are looked up under ``images_dir`` (default: the first of ``images/``, ``imgs/`` (SLAKE),
``VQA_RAD Image Folder/`` or the json's own folder that holds the first sample's image); every
sample's image must exist, otherwise a DataError lists the missing names.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from medlite.imaging.pixels import normalize_modality
from medlite.evaluation.samples import CLOSED, OPEN, VqaSample
from medlite.errors import DataError

BUILTIN_DATASETS = ("micro-med-vqa",)
VQA_RAD_KEYS = frozenset({"qid", "image_name", "question", "answer", "answer_type", "phrase_type"})
SLAKE_KEYS = frozenset({"img_id", "img_name", "question", "answer", "q_lang", "answer_type"})
LLAVA_MED_KEYS = frozenset({"id", "image", "answer_type"})
VQA_RAD_TEST = frozenset({"test_freeform", "test_para"})
SPLITS = ("test", "train", "validate", "all")
_SPLIT_ALIASES = {"val": "validate", "valid": "validate", "validation": "validate"}
_VQA_RAD_REGION = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
_IMAGE_DIR_CANDIDATES = ("images", "imgs", "VQA_RAD Image Folder")


def load_dataset(spec, *, images_dir=None, split: str = "test", lang: str = "en") -> list[VqaSample]:
    """Load a VQA dataset as :class:`VqaSample` records.

    ``spec``: ``builtin:micro-med-vqa``, a VQA-RAD / SLAKE / LLaVA-Med json file, or a folder holding
    ``{split}.json`` (SLAKE, LLaVA-Med) or a single json. ``split``: test | train | validate | all.
    ``lang``: SLAKE question language (en, zh or all); the other formats are English only.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    spec_s = str(spec)
    if spec_s.startswith("builtin:"):
        name = spec_s.split(":", 1)[1]
        if name not in BUILTIN_DATASETS:
            raise DataError(f"unknown built-in dataset {name!r}; available: "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
        from medlite.demo.micro_vqa import micro_med_vqa  # lazy: it may build images

        return micro_med_vqa(split)
    path = _resolve_json(Path(spec_s).expanduser(), split)
    records = _read_records(path)
    fmt = detect_format(records, path)
    if fmt == "vqa-rad":
        samples = _parse_vqa_rad(records, path, split, lang)
    elif fmt == "slake":
        _check_file_split(path, split)
        samples = _parse_slake(records, path, lang)
    else:
        _check_file_split(path, split)
        if lang not in ("en", "all"):
            raise DataError(f"{path}: LLaVA-Med files carry no language field; lang={lang!r} cannot be applied")
        samples = _parse_llava_med(records, path)
    if not samples:
        raise DataError(f"{path}: no {fmt} questions for split={split!r}, lang={lang!r}")
    return _attach_images(samples, path, images_dir)


def _resolve_json(p: Path, split: str) -> Path:
    if p.is_file():
        return p
    if p.is_dir():
        named = p / f"{split}.json"
        if named.is_file():
            return named
        jsons = sorted(f for f in p.glob("*.json") if f.is_file())
        if len(jsons) == 1:
            return jsons[0]
        raise DataError(f"{p}: folder has no {split}.json and {len(jsons)} json files "
                        f"({', '.join(f.name for f in jsons[:8])}); name the file")
    raise DataError(f"{p}: no such dataset file or folder")


def _read_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (a .jsonl answers file? use load_answers_jsonl)" if path.suffix == ".jsonl" else ""
        raise DataError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}{hint}") from None
    if not isinstance(data, list):
        keys = sorted(data)[:12] if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a JSON list of question records, got {type(data).__name__} "
                        f"(keys: {keys})")
    if not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: every record must be a JSON object")
    return data


def detect_format(records: list, path="<records>") -> str:
    """"vqa-rad", "slake" or "llava-med" from the keys of the records (DataError otherwise)."""
    if not records:
        raise DataError(f"{path}: the file holds no records")
    keys = set(records[0])
    if VQA_RAD_KEYS <= keys:
        fmt, need = "vqa-rad", VQA_RAD_KEYS
    elif SLAKE_KEYS <= keys:
        fmt, need = "slake", SLAKE_KEYS
    elif LLAVA_MED_KEYS <= keys and ({"conversations", "conversatons"} & keys):
        fmt, need = "llava-med", LLAVA_MED_KEYS
    else:
        raise DataError(
            f"{path}: unknown VQA format; keys seen: {sorted(keys)}. Expected VQA-RAD "
            f"({sorted(VQA_RAD_KEYS)}), SLAKE ({sorted(SLAKE_KEYS)}) or LLaVA-Med "
            f"({sorted(LLAVA_MED_KEYS | {'conversations'})})")
    for i, r in enumerate(records):
        missing = need - set(r)
        if missing:
            raise DataError(f"{path}: record {i} ({fmt}) lacks {sorted(missing)}")
    return fmt


def _answer_type(value, path: Path, qid) -> str:
    v = str(value).strip().upper()  # VQA-RAD has "CLOSED " with a trailing space twice
    if v in ("CLOSED", "CLOSE"):
        return CLOSED
    if v == "OPEN":
        return OPEN
    raise DataError(f"{path}: question {qid}: answer_type must be CLOSED or OPEN, got {value!r}")


def _meta(r: dict, keys) -> tuple:
    return tuple((k, r[k]) for k in keys if k in r and not isinstance(r[k], (list, dict)))


def _parse_vqa_rad(records: list, path: Path, split: str, lang: str) -> list[VqaSample]:
    if split == "validate":
        raise DataError(f"{path}: VQA-RAD has no validation split (use test, train or all)")
    if lang not in ("en", "all"):
        raise DataError(f"{path}: VQA-RAD questions are English only; lang={lang!r}")
    out = []
    for r in records:
        is_test = str(r["phrase_type"]).strip() in VQA_RAD_TEST
        if split == "test" and not is_test or split == "train" and is_test:
            continue
        qid = str(r["qid"])
        organ = str(r.get("image_organ", "")).strip().upper()
        out.append(VqaSample(
            qid=qid, question=str(r["question"]).strip(), answer=str(r["answer"]).strip(),
            answer_type=_answer_type(r["answer_type"], path, qid), image_id=str(r["image_name"]),
            modality="unknown", region=_VQA_RAD_REGION.get(organ, organ.lower() or "unknown"),
            image_path=Path(str(r["image_name"])),
            meta=_meta(r, ("question_type", "phrase_type", "image_organ", "qid_linked_id"))))
    return out


def _parse_slake(records: list, path: Path, lang: str) -> list[VqaSample]:
    out = []
    for r in records:
        if lang != "all" and str(r["q_lang"]) != lang:
            continue
        qid = str(r.get("qid", f"{r['img_id']}-{len(out)}"))
        out.append(VqaSample(
            qid=qid, question=str(r["question"]).strip(), answer=str(r["answer"]).strip(),
            answer_type=_answer_type(r["answer_type"], path, qid), image_id=str(r["img_name"]),
            modality=normalize_modality(r.get("modality")), region=str(r.get("location", "unknown")).lower(),
            image_path=Path(str(r["img_name"])),
            meta=_meta(r, ("img_id", "q_lang", "modality", "location", "content_type", "base_type"))))
    return out


def _parse_llava_med(records: list, path: Path) -> list[VqaSample]:
    out = []
    for r in records:
        qid = str(r["id"])
        turns = r.get("conversations", r.get("conversatons"))  # LLaVA-Med's own scorer reads both
        human = next((t for t in turns or [] if t.get("from") == "human"), None)
        gpt = next((t for t in turns or [] if t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise DataError(f"{path}: question {qid}: conversations need a 'human' and a 'gpt' turn")
        question = str(human.get("value", "")).replace("<image>", "").strip()
        out.append(VqaSample(
            qid=qid, question=question, answer=str(gpt.get("value", "")).strip(),
            answer_type=_answer_type(r["answer_type"], path, qid), image_id=str(r["image"]),
            image_path=Path(str(r["image"])), meta=(("format", "llava-med"),)))
    return out


def _check_file_split(path: Path, split: str) -> None:
    """A per-split file (SLAKE, LLaVA-Med) must not silently stand in for another split."""
    stem = _SPLIT_ALIASES.get(path.stem.lower(), path.stem.lower())
    if stem in SPLITS and split != "all" and stem != split:
        raise DataError(f"{path}: this file is the {stem} split but split={split!r} was asked "
                        f"(pass split={stem!r} or the {split}.json file)")


def _attach_images(samples: list[VqaSample], path: Path, images_dir) -> list[VqaSample]:
    if images_dir is not None:
        root = Path(images_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"images folder {root} does not exist")
    else:
        candidates = [path.parent / c for c in _IMAGE_DIR_CANDIDATES] + [path.parent]
        first = samples[0].image_path
        root = next((c for c in candidates if (c / first).is_file()),
                    next(c for c in candidates if c.is_dir()))
    missing = sorted({str(s.image_path) for s in samples if not (root / s.image_path).is_file()})
    if missing:
        shown = ", ".join(missing[:10]) + (f" … (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DataError(f"{path}: {len(missing)} image(s) missing under {root}: {shown}"
                        + ("" if images_dir is not None else "; pass images_dir= (--images) to name the folder"))
    return [dataclasses.replace(s, image_path=root / s.image_path) for s in samples]


def load_answers_jsonl(path) -> dict[str, str]:
    """Read a LLaVA-Med answers file (one JSON object per line with ``question_id`` and ``text``)
    into ``{question_id: text}``; blank lines are skipped, duplicates are an error."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{p}: no such answers file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read: {e}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {n} is not valid JSON: {e.msg}") from None
        if not isinstance(rec, dict) or "question_id" not in rec or "text" not in rec:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{p}: line {n} needs 'question_id' and 'text' (keys seen: {keys})")
        qid = str(rec["question_id"])
        if qid in out:
            raise DataError(f"{p}: line {n}: question_id {qid} appears twice")
        out[qid] = str(rec["text"])
    return out


def describe(samples: list[VqaSample]) -> str:
    """One line: "451 questions (272 closed / 179 open) on 203 images · CT 120 · unknown 331"."""
    from collections import Counter

    closed = sum(s.answer_type == CLOSED for s in samples)
    mods = Counter(s.modality for s in samples)
    parts = " · ".join(f"{m} {c}" for m, c in sorted(mods.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"{len(samples)} questions ({closed} closed / {len(samples) - closed} open) on "
            f"{len({s.image_id for s in samples})} images · {parts}")
