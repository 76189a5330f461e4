"""``medlite ask`` on a checkpoint (PyTorch) names the checkpoint that answers; a mistyped one is an error."""
from __future__ import annotations

import json

from medlite.cli import main

Q = "Is the tissue malignant?"


def test_checkpoint_that_answers_is_named(random_ckpt, photo, tmp_path, capsys):
    src = random_ckpt("tiny", "legacy")
    img = tmp_path / "slide.png"
    photo.save(img)
    argv = ["--cache-dir", str(tmp_path / "cache"), "ask", str(src), Q, "--image", str(img), "--max-new-tokens", "3"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    model = next(line for line in lines if line.startswith("model: "))
    assert model == f"model: {src} · hashes skipped (a checkpoint: no manifest.json) · PyTorch (CPU) · model fp32"
    assert lines[-1].startswith(f"image: {img} · window as stored (8-bit) · latency ")
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["folder"] == str(src) and out["model"]["runtime"] == "PyTorch (CPU)"
    assert out["model"]["format"] == "legacy" and out["image"]["file"] == str(img)
    assert not (tmp_path / "cache" / "demo-model").exists()


def test_file_given_as_model_is_not_called_a_missing_folder(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    for argv in (["inspect", "--model", str(notes)], ["ask", "--model", str(notes), "--image", str(notes), "q?"],
                 ["eval", "--model", str(notes)]):
        assert main(["--cache-dir", str(tmp_path / "cache"), *argv]) == 2
        err = capsys.readouterr().err
        assert f"{notes}: is a file, not a" in err and "not found" not in err, (argv, err)


def test_the_demo_model_is_named_as_such(tmp_path):
    """Without a model, the answer says it comes from the built-in demo model (and where it is cached)."""
    from types import SimpleNamespace

    import torch

    from medlite.checkpoints.commands import _checkpoint_facts
    from medlite.model_choice import ModelChoice

    loaded = SimpleNamespace(model=torch.nn.Linear(2, 2), name="demo",
                             source=SimpleNamespace(format="hf", name="demo"))
    facts = _checkpoint_facts(ModelChoice(), loaded, tmp_path)
    assert facts["folder"] == f"built-in demo model ({tmp_path})" and facts["precision"] == {"model": "fp32"}
    from medlite.runtime.commands import model_line

    assert model_line({**facts, "runtime": "PyTorch (CPU)"}).startswith(f"model: built-in demo model ({tmp_path}) · ")
