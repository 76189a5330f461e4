"""``medlite serve`` refuses what it must refuse before serving anything: no artifact, a network
interface without --allow-remote, a folder that is not an artifact, an artifact whose files changed."""
from __future__ import annotations

import shutil

import pytest

from medlite.cli import main


def test_serve_needs_an_artifact(capsys):
    assert main(["serve"]) == 2
    assert "name the artifact to serve" in capsys.readouterr().err


def test_network_interface_needs_allow_remote(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and "0.0.0.0" in err


def test_not_an_artifact(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a medlite artifact" in capsys.readouterr().err


def test_two_different_artifacts(tmp_path, capsys):
    (tmp_path / "a").mkdir()   # existing folders: a missing --model path is refused before serve runs
    (tmp_path / "b").mkdir()
    assert main(["serve", str(tmp_path / "a"), "--model", str(tmp_path / "b")]) == 2
    assert "two artifacts given" in capsys.readouterr().err


@pytest.mark.slow
def test_changed_artifact_is_refused_before_serving(serve_artifact, tmp_path, capsys):
    copy = tmp_path / serve_artifact.name
    shutil.copytree(serve_artifact, copy)
    with open(copy / "tokenizer.json", "a", encoding="utf-8") as f:
        f.write(" ")
    assert main(["serve", str(copy), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "files do not match manifest.json" in err and "tokenizer.json: size" in err
