"""``latest`` (OUT/<model>/<recipe>/latest, or OUT/<model>/<recipe>) is accepted by verify as serve takes it
(issue 26, item 10)."""
from __future__ import annotations

import json

import pytest

from medlite import artifacts as af
from medlite.cli import main
from test_cli_robust import _fake_artifact


@pytest.mark.parametrize("suffix", ["latest", ""])
def test_verify_accepts_latest(tmp_path, capsys, suffix):
    art = _fake_artifact(tmp_path)
    target = art.parent / suffix if suffix else art.parent
    assert main(["verify", "--json", "--skip-checks", str(target)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["artifact"] == str(art) and out["version"] == art.name and out["ok"]


def test_latest_naming_a_missing_version_is_one_line(tmp_path, capsys):
    art = _fake_artifact(tmp_path)
    af.update_latest(art.parent, "9.9+0000000")
    assert main(["verify", str(art.parent / "latest")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names version '9.9+0000000'" in err
