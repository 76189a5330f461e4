"""Recipe overrides (``key=value``) are found after global options placed before the command too."""
from __future__ import annotations

from medlite.cli import _split_overrides, main


def test_overrides_after_global_options_before_the_command():
    assert _split_overrides(["--cache-dir", "/x", "build", "r.yaml", "a.b=1", "--model", "m"]) == (
        ["--cache-dir", "/x", "build", "r.yaml", "--model", "m"], ["a.b=1"])
    assert _split_overrides(["--quiet", "--seed=3", "plan", "r.yaml", "x=1"]) == (
        ["--quiet", "--seed=3", "plan", "r.yaml"], ["x=1"])
    assert _split_overrides(["ask", "x", "a=b"]) == (["ask", "x", "a=b"], [])


def test_validate_with_global_option_first_applies_the_override(tmp_path, capsys):
    # `medlite --cache-dir DIR validate RECIPE key=value` was "unrecognized arguments: key=value"
    rc = main(["--cache-dir", str(tmp_path), "validate", "xavier-agx-fp16", "export.precision=fp32", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    import json

    stages = json.loads(out.out)["recipe"]["stages"]
    assert next(s["export"] for s in stages if "export" in s)["precision"] == "fp32"
