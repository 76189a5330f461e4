"""Every command that takes a model refuses a named model that is not there — one line naming it, before
any work — and never falls back to the built-in demo model (issue 26, acceptance)."""
from __future__ import annotations

import argparse
import time

import pytest

from medlite.cli import HANDLERS, build_parser, main

MISSING = "copies/goood"      # a mistyped artifact path, as a new user typed it


def _model_commands() -> set[str]:
    """Handler keys whose parser takes a model: ``--model`` or a PATH / ARTIFACT positional."""
    out = set()
    for a in build_parser()._actions:
        if not isinstance(a, argparse._SubParsersAction):
            continue
        for name, sp in a.choices.items():
            dests = {x.dest for x in sp._actions}
            if dests & {"model", "path", "artifact"}:
                out.add(name)
    return out


def _argv(tmp_path, img) -> list[tuple[str, list[str]]]:
    """One or more command lines per model-taking command, every other required argument filled in."""
    out = str(tmp_path / "out")
    recipe = "xavier-agx-fp16"
    return [
        ("inspect", ["inspect", "--model", MISSING]),
        ("inspect", ["inspect", MISSING]),                         # the deprecated positional
        ("convert", ["convert", "--model", MISSING, "--out", out]),
        ("ask", ["ask", MISSING, "--image", img, "Is there a lesion?"]),
        ("ask", ["ask", "--model", MISSING, "--image", img, "Is there a lesion?"]),
        ("ask", ["ask", "Is there a lesion?", "--image", img, "--base", MISSING]),
        ("eval", ["eval", "--model", MISSING]),
        ("export", ["export", "--model", MISSING, "--out", out]),
        ("plan", ["plan", recipe, "--model", MISSING]),
        ("build", ["build", recipe, "--model", MISSING, "--out", out]),
        ("build", ["build", recipe, "--vision-tower", MISSING, "--out", out]),
        ("verify", ["verify", MISSING]),
        ("serve", ["serve", MISSING]),
        ("serve", ["serve", "--model", MISSING]),
        ("bench", ["bench", "--model", MISSING]),
        ("sweep", ["sweep", "recipes/sweeps/demo-precision.yaml", "--model", MISSING, "--out", out]),
        ("bundle", ["bundle", "--model", MISSING, "--out", str(tmp_path / "b.tar.gz")]),
        ("sweep", ["sweep", "recipes/sweeps/demo-precision.yaml", "--model", MISSING, "--out", out]),
        ("bundle", ["bundle", "--model", MISSING, "--out", str(tmp_path / "b.tar.gz")]),
        ("embed", ["embed", "--model", MISSING, "--images", img, "--out", str(tmp_path / "e.npz")]),
    ]


@pytest.fixture()
def img(tmp_path):
    from PIL import Image

    p = tmp_path / "scan.png"
    Image.new("L", (64, 64), 128).save(p)
    return str(p)


def test_every_model_command_is_covered(tmp_path, img):
    covered = {name for name, _ in _argv(tmp_path, img)}
    missing = {c for c in _model_commands() if c in HANDLERS} - covered
    assert not missing, f"add a command line for {sorted(missing)} to this test"


def test_a_named_model_that_is_not_there_is_one_line_and_no_demo_model(tmp_path, img, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MEDLITE_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)                       # MISSING is relative: it does not exist here
    cases = [(name, argv) for name, argv in _argv(tmp_path, img) if name in HANDLERS]
    t0 = time.perf_counter()
    for name, argv in cases:
        rc = main(argv)
        cap = capsys.readouterr()
        assert rc != 0, (argv, cap.err)
        assert cap.out == "", (argv, cap.out)
        lines = cap.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {MISSING}: no such file or folder"), (argv, lines)
        assert list(cache.iterdir()) == [], f"{argv}: wrote to the cache ({list(cache.iterdir())})"
        assert not (tmp_path / "out").exists(), f"{argv}: created its --out folder"
    # nothing was loaded, built or trained: every refusal comes before the work
    assert time.perf_counter() - t0 < 5 * len(cases) ** 0.5, "refusals should be instant"


def test_a_file_named_as_a_model_says_it_is_a_file(tmp_path, img, monkeypatch, capsys):
    monkeypatch.setenv("MEDLITE_CACHE", str(tmp_path / "cache"))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    for argv in (["inspect", "--model", str(notes)], ["export", "--model", str(notes), "--out", str(tmp_path / "o")],
                 ["verify", str(notes)], ["bench", "--model", str(notes)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {notes}: is a file, not ") and "not found" not in err, (argv, err)
        assert err.count("\n") == 1
    assert not (tmp_path / "cache").exists()


def test_question_without_a_path_still_uses_the_default_model_choice():
    """Only a word that looks like a path is taken as the model; an ordinary question stays a question."""
    from medlite.model_choice import looks_like_path

    assert not looks_like_path("Is there a lesion?") and not looks_like_path("which organ is this ?")
    assert not looks_like_path("Is the T1/T2 ratio high?")       # a question with a slash and spaces
    for word in ("copies/goood", "./art", "~/models/x", "model.onnx", "ckpt.safetensors", "a.tar.gz"):
        assert looks_like_path(word), word


def test_ask_refuses_a_folder_that_holds_no_model_and_two_models(tmp_path, img, monkeypatch, capsys):
    monkeypatch.setenv("MEDLITE_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ask", str(empty), "--image", img, "Is there a lesion?"]) == 2
    assert capsys.readouterr().err == (f"error: {empty}: not a model folder: no medlite_runtime.json or "
                                       "manifest.json (an ONNX export or artifact) and no config.json (a checkpoint)\n")
    assert main(["ask", "--model", str(empty), "copies/goood", "--image", img, "Is there a lesion?"]) == 2
    assert "two models given" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
