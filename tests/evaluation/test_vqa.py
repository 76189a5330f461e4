"""VQA dataset readers on real annotation samples (tests/evaluation/fixtures, see its README)."""
from __future__ import annotations

import json
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medlite.evaluation.scoring import score
from medlite.evaluation.vqa import describe, detect_format, load_answers_jsonl, load_dataset
from medlite.errors import DataError

FIX = Path(__file__).parent / "fixtures"


def make_images(root: Path, names) -> None:
    for n in set(names):
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(n) * 7 % 255, 40, 90)).save(p, format="JPEG")


@pytest.fixture
def vqa_rad(tmp_path):
    shutil.copy(FIX / "vqa_rad.json", tmp_path / "VQA_RAD Dataset Public.json")
    recs = json.loads((FIX / "vqa_rad.json").read_text())
    make_images(tmp_path / "images", [r["image_name"] for r in recs])
    return tmp_path / "VQA_RAD Dataset Public.json"


@pytest.fixture
def slake(tmp_path):
    root = tmp_path / "Slake1.0"
    shutil.copytree(FIX / "slake", root)
    names = [r["img_name"] for f in root.glob("*.json") for r in json.loads(f.read_text())]
    make_images(root / "imgs", names)
    return root


def test_vqa_rad_splits_and_fields(vqa_rad):
    test = load_dataset(vqa_rad)
    assert len(test) == 20 and Counter(s.answer_type for s in test) == {"closed": 10, "open": 10}
    assert len({s.image_id for s in test}) == 12
    assert Counter(s.region for s in test) == {"chest": 13, "abdomen": 5, "head": 2}
    assert {s.modality for s in test} == {"unknown"}  # VQA-RAD records carry no modality
    first = test[0]
    assert (first.qid, first.answer, first.answer_type, first.image_id) == ("10", "yes", "closed", "synpic42202.jpg")
    assert first.question == "Is there evidence of an aortic aneurysm?"
    assert dict(first.meta)["phrase_type"] == "test_freeform" and dict(first.meta)["question_type"] == "PRES"
    assert first.image_path == vqa_rad.parent / "images" / "synpic42202.jpg"
    assert first.load_image().size == (8, 8)
    train = load_dataset(vqa_rad, split="train")
    assert len(train) == 22 and not ({s.qid for s in train} & {s.qid for s in test})
    quirks = {s.qid: s for s in train if s.qid in ("2156", "1511")}
    assert quirks["2156"].answer_type == "closed"  # "CLOSED " with a trailing space
    assert quirks["1511"].answer == "4"            # integer answer in the JSON
    assert len(load_dataset(vqa_rad, split="all")) == 42
    assert describe(test).startswith("20 questions (10 closed / 10 open) on 12 images · unknown 20")
    with pytest.raises(DataError, match="no validation split"):
        load_dataset(vqa_rad, split="validate")
    with pytest.raises(DataError, match="English only"):
        load_dataset(vqa_rad, lang="zh")


def test_missing_images_are_listed(vqa_rad):
    imgs = sorted((vqa_rad.parent / "images").iterdir())
    for p in imgs[:12]:
        p.unlink()
    with pytest.raises(DataError) as e:
        load_dataset(vqa_rad, split="all")
    msg = str(e.value)
    assert "12 image(s) missing under" in msg and "(+2 more)" in msg and imgs[0].name in msg
    assert msg.count(".jpg") == 10 and "images_dir=" in msg


def test_explicit_images_dir(vqa_rad, tmp_path):
    other = tmp_path / "elsewhere"
    shutil.move(str(vqa_rad.parent / "images"), other)
    samples = load_dataset(vqa_rad, images_dir=other)
    assert all(s.image_path.parent == other for s in samples)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(vqa_rad, images_dir=tmp_path / "nope")


def test_slake_folder_splits_languages_modalities(slake):
    test = load_dataset(slake)  # folder → test.json, English
    assert len(test) == 15 and Counter(s.answer_type for s in test) == {"closed": 5, "open": 10}
    assert Counter(s.modality for s in test) == {"CT": 12, "CR": 3}  # X-Ray → CR
    s0 = test[0]
    assert (s0.qid, s0.answer, s0.image_id, s0.region) == ("11934", "CT", "xmlab102/source.jpg", "lung")
    assert s0.image_path == slake / "imgs" / "xmlab102" / "source.jpg"
    assert dict(s0.meta)["content_type"] == "Modality" and dict(s0.meta)["q_lang"] == "en"
    assert len(load_dataset(slake, lang="zh")) == 3 and len(load_dataset(slake, lang="all")) == 18
    train = load_dataset(slake, split="train")
    assert len(train) == 12 and Counter(s.modality for s in train) == {"MR": 7, "CT": 5}
    assert len(load_dataset(slake, split="val")) == 12
    with pytest.raises(DataError, match="this file is the train split but split='test'"):
        load_dataset(slake / "train.json")


def test_format_detected_from_content_not_name(slake, tmp_path):
    renamed = slake / "questions.json"
    shutil.copy(slake / "test.json", renamed)
    assert len(load_dataset(renamed)) == 15
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps([{"image": "x.png", "q": "?", "a": "yes"}]))
    with pytest.raises(DataError, match=r"other.json: unknown VQA format; keys seen: \['a', 'image', 'q'\]"):
        load_dataset(bad)
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match="expected a JSON list.*questions"):
        load_dataset(bad)
    bad.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON at line 1"):
        load_dataset(bad)
    assert detect_format(json.loads((FIX / "llavamed" / "vqarad_test.json").read_text())) == "llava-med"
    recs = json.loads((FIX / "vqa_rad.json").read_text())
    del recs[3]["answer"]
    with pytest.raises(DataError, match=r"record 3 \(vqa-rad\) lacks \['answer'\]"):
        detect_format(recs, "x.json")
    with pytest.raises(DataError, match="no such dataset"):
        load_dataset(tmp_path / "missing.json")


def test_llava_med_conversations_and_answers(tmp_path):
    for f in ("vqarad_test.json", "slake_test.json", "answers.jsonl"):
        shutil.copy(FIX / "llavamed" / f, tmp_path / f)
    recs = json.loads((FIX / "llavamed" / "vqarad_test.json").read_text())
    make_images(tmp_path, [r["image"] for r in recs])  # images next to the json
    samples = load_dataset(tmp_path / "vqarad_test.json")
    assert [(s.qid, s.question, s.answer, s.answer_type) for s in samples] == [
        ("10", "Is there evidence of an aortic aneurysm?", "yes", "closed"),
        ("12", "Is there airspace consolidation on the left side?", "Yes", "closed"),
        ("13", "Is this an axial plane?", "yes", "closed")]
    assert samples[0].image_path == tmp_path / "synpic42202.jpg"
    answers = load_answers_jsonl(tmp_path / "answers.jsonl")
    assert answers == {"10": "Yes", "12": "No, the lungs are normal", "13": "normal"}
    r = score(answers, samples)
    # 10: yes/Yes right; 12: "No, ..." wrong both ways; 13: "normal" is no yes/no and not "yes"
    assert (r["closed_accuracy"], r["closed_substring"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    slake_recs = json.loads((FIX / "llavamed" / "slake_test.json").read_text())
    make_images(tmp_path / "images", [r["image"] for r in slake_recs])
    s2 = load_dataset(tmp_path / "slake_test.json")
    assert [s.answer for s in s2] == ["CT", "Chest", "Lung, Spinal Cord"] and s2[0].answer_type == "open"
    assert s2[0].image_path == tmp_path / "images" / "xmlab102" / "source.jpg"


def test_answers_jsonl_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(DataError, match="line 2: question_id 1 appears twice"):
        load_answers_jsonl(p)
    p.write_text('{"question_id": 1}\n')
    with pytest.raises(DataError, match="line 1 needs 'question_id' and 'text'"):
        load_answers_jsonl(p)
    p.write_text('{"question_id": 1, "text": "a"\n')
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_answers_jsonl(p)
    with pytest.raises(DataError, match="no such answers file"):
        load_answers_jsonl(tmp_path / "none.jsonl")


def test_builtin_dispatch_is_lazy(monkeypatch):
    calls = []
    fake = types.ModuleType("medlite.demo.micro_vqa")
    fake.micro_med_vqa = lambda split: calls.append(split) or ["sample"]
    monkeypatch.setitem(sys.modules, "medlite.demo.micro_vqa", fake)
    assert load_dataset("builtin:micro-med-vqa", split="train") == ["sample"] and calls == ["train"]
    with pytest.raises(DataError, match="unknown built-in dataset 'nope'.*builtin:micro-med-vqa"):
        load_dataset("builtin:nope")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("builtin:micro-med-vqa", split="dev")
