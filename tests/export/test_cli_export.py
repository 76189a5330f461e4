"""``medlite export`` end to end on a random tiny checkpoint, then ``medlite ask`` on the result."""
from __future__ import annotations

import json

from export_tiny_model import random_image
from medlite.cli import main
from medlite.runtime import OnnxVlm
from medlite.runtime.config import RuntimeConfig


def test_export_then_ask(ctx, tmp_path, capsys):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    ckpt = write_random_checkpoint("tiny", tmp_path / "ckpt", fmt="factory", ctx=ctx)
    out = tmp_path / "onnx16"
    assert main(["--quiet", "--cache-dir", str(tmp_path / "cache"), "export", "--model", str(ckpt),
                 "--out", str(out), "--precision", "fp16", "--opset", "16"]) == 0
    cfg = RuntimeConfig.load(out)
    assert cfg.precision == "fp16" and cfg.opset == 16 and cfg.source["format"] == "factory"
    assert all(c["ok"] for c in cfg.trt_check.values())
    img = tmp_path / "img.png"
    random_image(2).save(img)
    capsys.readouterr()
    assert main(["--quiet", "--cache-dir", str(tmp_path / "cache"), "ask", str(out), "which organ is this ?",
                 "--image", str(img), "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    from PIL import Image

    assert printed == OnnxVlm.open(out).answer(Image.open(img), "which organ is this ?", max_new_tokens=6)


def test_export_json_and_errors(ctx, tmp_path, capsys):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    ckpt = write_random_checkpoint("tiny", tmp_path / "ckpt", fmt="legacy", ctx=ctx)
    capsys.readouterr()
    code = main(["--cache-dir", str(tmp_path / "cache"), "export", "--model", str(ckpt), "--out",
                 str(tmp_path / "o"), "--opset", "13"])
    assert code == 2 and "opset 13 is not supported" in capsys.readouterr().err


def test_export_refuses_a_folder_with_other_files_and_replaces_an_earlier_export(ctx, tmp_path, capsys):
    """Issue 26 #3: `export --out` a folder with a user's files refused them untouched; an earlier export
    is replaced as a whole and the replaced files are named."""
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    ckpt = write_random_checkpoint("tiny", tmp_path / "ckpt", fmt="legacy", ctx=ctx)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "vision.onnx").write_bytes(b"the user's own graph")
    (out / "notes.txt").write_text("keep me")
    base = ["--cache-dir", str(tmp_path / "cache"), "export", "--model", str(ckpt), "--out", str(out),
            "--precision", "fp32"]
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "notes.txt" in err and "not empty" in err
    assert (out / "vision.onnx").read_bytes() == b"the user's own graph"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "vision.onnx"]

    fresh = tmp_path / "fresh"
    assert main(["--quiet"] + base[:-3] + [str(fresh), "--precision", "fp32"]) == 0
    first = RuntimeConfig.load(fresh)
    assert first.precision == "fp32"
    capsys.readouterr()
    assert main(base[:-3] + [str(fresh), "--precision", "fp16"]) == 0     # an earlier export: replaced
    err = capsys.readouterr().err
    assert "replaced the earlier export" in err and "vision.onnx" in err
    assert RuntimeConfig.load(fresh).precision == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no staging leftovers
