"""``medlite eval --model ARTIFACT``: a built artifact (or ONNX export) evaluated on ONNX Runtime.

Issue 30: eval used to refuse an artifact ("--model takes the checkpoint it was built from"). The
metrics must equal :func:`medlite.evaluation.scoring.score` on answers made independently, one
``OnnxVlm.answer`` call per question; a changed file is refused before anything runs, as ``ask`` does.
"""
from __future__ import annotations

import json

import pytest

from medlite.cli import main
from medlite.context import RunContext

N = 12   # questions: enough for closed and open ones, seconds on 2 cores


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny random checkpoint built with the shipped fp16 recipe at fp32 (gates off: random weights)."""
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    root = tmp_path_factory.mktemp("evalart")
    ckpt = root / "tiny"
    write_random_checkpoint("tiny", ckpt, fmt="legacy", ctx=RunContext(cache_dir=root / "cache", quiet=True))
    rc = main(["build", "xavier-agx-fp16", "--quiet", "--cache-dir", str(root / "cache"), "--model", str(ckpt),
               "--vision-tower", str(ckpt / "vision_tower"), "--out", str(root / "out"), "export.precision=fp32",
               "evaluation.max_samples=8", "engines.max_prompt_tokens=512", "check.max_closed_acc_drop=null", "check.min_agreement=null",
               "check.min_vision_cosine=null", "check.max_mean_kl=null"])
    assert rc == 0
    (art,) = [p for p in (root / "out").glob("*/*/*") if (p / "manifest.json").is_file()]
    return {"root": root, "artifact": art}


def _eval(capsys, *args) -> tuple[int, dict, str]:
    rc = main(["eval", "--json", "--quiet", *args])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else {}), cap.err


def test_eval_artifact_equals_independent_answers(built, capsys, tmp_path):
    from medlite.evaluation.scoring import score
    from medlite.evaluation.vqa import load_dataset
    from medlite.runtime.vlm import OnnxVlm

    art = built["artifact"]
    out = tmp_path / "pred.json"
    rc, res, err = _eval(capsys, "--model", str(art), "--limit", str(N), "--cache-dir", str(built["root"] / "cache"),
                         "--out", str(out))
    assert rc == 0, err
    samples = load_dataset("builtin:micro-med-vqa", split="test")[:N]
    vlm = OnnxVlm.open(art)
    preds = [vlm.answer(s.load_image(), s.question) for s in samples]
    expected = score(preds, samples)
    for key in ("closed_accuracy", "closed_substring", "open_exact", "open_recall", "n", "n_closed", "n_open"):
        assert res["metrics"][key] == expected[key], key
    saved = json.loads(out.read_text())
    assert [p["prediction"] for p in saved["predictions"]] == preds
    assert res["model"]["folder"] == str(art) and res["model"]["hash_check"].startswith("checked")
    assert res["model"]["version"] == art.name and res["model"]["precision"]


def test_eval_artifact_latest_and_tampered(built, capsys, tmp_path):
    import shutil

    art = built["artifact"]
    rc, res, err = _eval(capsys, "--model", str(art.parent), "--limit", "2")    # OUT/<model>/<recipe>: latest
    assert rc == 0, err
    assert res["model"]["folder"] == str(art)
    copy = tmp_path / art.name
    shutil.copytree(art, copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    rc, _, err = _eval(capsys, "--model", str(copy), "--limit", "2")
    assert rc == 2 and "tokenizer.json" in err and "answer" not in err
    rc, _, err = _eval(capsys, "--model", str(art), "--limit", "2", "--vision-tower", str(tmp_path))
    assert rc == 2 and "--vision-tower applies to a checkpoint" in err
