"""``medlite ask`` on an ONNX export: natural argument order, several questions, refused inputs."""
from __future__ import annotations

import json
import shutil

import pytest

from export_tiny_model import random_image
from medlite.cli import main
from medlite.runtime import OnnxVlm

Q1, Q2 = "is there a lesion in the lung ?", "which organ is this ?"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "img.png"
    random_image(0).save(p)
    return p


def _expected(export, image, q):
    from PIL import Image

    return OnnxVlm.open(export).answer(Image.open(image).convert("RGB"), q, max_new_tokens=8)


def test_natural_order_and_several_questions(rt_export, image, capsys):
    # options between the artifact and the question: argparse alone says "unrecognized arguments"
    assert main(["ask", str(rt_export), "--image", str(image), Q1, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == _expected(rt_export, image, Q1)
    assert main(["ask", str(rt_export), "--image", str(image), Q1, Q2, "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"answers": [{"question": Q1, "answer": _expected(rt_export, image, Q1)},
                               {"question": Q2, "answer": _expected(rt_export, image, Q2)}]}
    assert main(["ask", "--model", str(rt_export), Q1, Q2, "--image", str(image), "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Q: {Q1}", f"A: {_expected(rt_export, image, Q1)}", f"Q: {Q2}",
                     f"A: {_expected(rt_export, image, Q2)}"]


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "-5", Q1], "--max-new-tokens must be at least 1, got -5"),
    (["   "], "a question is empty"),
])
def test_bad_arguments_are_clear_errors(rt_export, image, capsys, extra, message):
    assert main(["ask", str(rt_export), "--image", str(image), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_artifact_without_its_manifest_is_refused(rt_export, image, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(rt_export, art)
    (art / "recipe.yaml").write_text("name: x\n")       # a built artifact ...
    (art / "report.md").write_text("# report\n")        # ... whose manifest.json was deleted
    assert main(["ask", str(art), "--image", str(image), Q1]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is missing" in err and "refused" in err
    assert capsys.readouterr().out == ""                # nothing answered
