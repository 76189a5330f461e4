"""``evaluate`` / ``medlite eval`` / ``medlite demo model`` on a tiny trained legacy checkpoint.

The metrics must equal :func:`medlite.evaluation.scoring.score` on predictions made independently
(one ``generate.answer`` call per question), so batching and bookkeeping cannot change a number.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from medlite.demo import model as dm
from medlite.demo.train import image_spec_for, train_demo
from medlite.evaluation.evaluate import evaluate
from medlite.demo.micro_vqa import micro_med_vqa
from medlite.evaluation.scoring import score
from medlite.cli import main
from medlite.context import RunContext

from medlite.demo.train import DemoRecipe

# small enough to train in seconds (plumbing, not accuracy); the same shape as test_demo_model's
TINY = DemoRecipe(image_size=56, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                  vision_intermediate=64, text_hidden=48, text_layers=1, text_heads=2, text_kv_heads=1,
                  text_intermediate=96, steps=4, batch_size=8, warmup=2, vision_steps=2, vision_batch=8)

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny model trained for a few steps, written as a legacy TinyLLaVA checkpoint."""
    from medlite.checkpoints import write_checkpoint

    ctx = RunContext(quiet=True)
    model, tok, _ = train_demo(micro_med_vqa("train", size=TINY.image_size)[::25], TINY, ctx=ctx)
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    spec = image_spec_for(TINY)
    write_checkpoint(model, tok, out, fmt="legacy", image_spec=spec, template_name="vicuna_v1",
                     text_backbone="llama", dtype=torch.float32, vision_tower_repo=dm.TOWER_REPO)
    dm.write_tower_config(model, out, spec)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    from medlite.checkpoints import load_model

    return load_model(tiny_ckpt, ctx=RunContext(quiet=True))


@pytest.fixture(scope="module")
def samples():
    test = micro_med_vqa("test", size=TINY.image_size)
    return test[::23]  # every question type and all four held-out sources


def test_metrics_equal_scoring_on_independent_predictions(loaded, samples):
    from medlite.checkpoints.generate import answer

    result = evaluate(loaded, samples, ctx=RunContext(quiet=True), batch_size=5)
    independent = [answer(loaded, s.load_image(), s.question) for s in samples]
    assert [p["prediction"] for p in result["predictions"]] == independent
    ref = score(independent, samples)
    m = result["metrics"]
    for k in ("n", "n_closed", "closed_accuracy", "closed_substring", "by_modality"):
        assert m[k] == ref[k], k
    types = {dict(s.meta)["question_type"] for s in samples}
    assert set(m["by_question_type"]) == types
    for t, agg in m["by_question_type"].items():
        idx = [i for i, s in enumerate(samples) if dict(s.meta)["question_type"] == t]
        assert agg["closed_accuracy"] == score([independent[i] for i in idx], [samples[i] for i in idx])["closed_accuracy"]
    row = result["predictions"][0]
    assert row["qid"] == samples[0].qid and row["answer"] == samples[0].answer and "correct" in row


def test_cli_eval_json_and_out_file(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    rc = main(["--cache-dir", str(tmp_path / "cache"), "eval", "--model", str(tiny_ckpt), "--limit", "12",
               "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert "predictions" not in printed and len(written["predictions"]) == 12
    samples = micro_med_vqa("test", size=TINY.image_size)[:12]
    preds = [p["prediction"] for p in written["predictions"]]
    ref = score(preds, samples)
    assert printed["metrics"]["closed_accuracy"] == ref["closed_accuracy"] == written["metrics"]["closed_accuracy"]
    assert printed["dataset"] == {"spec": "builtin:micro-med-vqa", "split": "test", "n": 12, "limit": 12}


def test_cli_eval_human_report_on_a_file_dataset_with_open_questions(tiny_ckpt, tmp_path, capsys):
    """VQA-RAD (real annotation format, stand-in images): open metrics and the modality table."""
    shutil.copy(FIX / "vqa_rad.json", tmp_path / "VQA_RAD Dataset Public.json")
    recs = json.loads((FIX / "vqa_rad.json").read_text())
    (tmp_path / "images").mkdir()
    for r in recs:
        Image.new("RGB", (40, 30), (len(r["image_name"]) * 7 % 255, 60, 90)).save(tmp_path / "images" / r["image_name"])
    rc = main(["--cache-dir", str(tmp_path / "cache"), "eval", "--model", str(tiny_ckpt), "--dataset",
               str(tmp_path / "VQA_RAD Dataset Public.json"), "--images", str(tmp_path / "images"), "--split", "all",
               "--limit", "10"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "closed accuracy (whole word)" in text and "closed substring (LLaVA-Med rule)" in text
    assert "by modality" in text
    from medlite.evaluation.vqa import load_dataset

    samples = load_dataset(tmp_path / "VQA_RAD Dataset Public.json", images_dir=tmp_path / "images", split="all")[:10]
    if any(s.answer_type == "open" for s in samples):
        assert "open exact / token recall" in text


def test_cli_eval_rejects_bad_limit(tiny_ckpt, tmp_path, capsys):
    rc = main(["--cache-dir", str(tmp_path), "eval", "--model", str(tiny_ckpt), "--limit", "0"])
    assert rc == 2 and "--limit" in capsys.readouterr().err


def test_cli_demo_model_prints_the_cached_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dm, "DemoRecipe", lambda: TINY)  # the real recipe is the slow test's job
    rc = main(["--cache-dir", str(tmp_path), "--quiet", "demo", "model"])
    assert rc == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "demo-model" / dm.demo_model_key(TINY)
    assert (path / "config.json").is_file() and (path / dm.MARKER).is_file()
