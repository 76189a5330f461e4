"""``medlite validate``, ``recipes ls`` and ``recipes cp`` through the CLI entry point."""
import json

from medlite.cli import main
from medlite.recipes import builtin_recipes

from recipe_helpers import GOOD, write


def test_validate_ok_and_every_error_in_json(tmp_path, capsys):
    p = write(tmp_path, GOOD)
    assert main(["validate", str(p)]) == 0
    assert "valid — test-fp16 1.2.3 for jetson-xavier-agx-32gb (export → check)" in capsys.readouterr().err
    bad = write(tmp_path, GOOD.replace("fp16", "fp8").replace("0.99", "1.5"), "bad.yaml")
    assert main(["validate", str(bad), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is False and len(out["errors"]) == 2
    assert out["errors"][0].startswith("stages[0].export.precision: must be one of fp32, fp16")
    assert out["errors"][1].startswith("stages[1].check.min_agreement: must be a fraction")


def test_validate_human_errors_exit_2_with_overrides_applied(tmp_path, capsys):
    p = write(tmp_path, GOOD)
    assert main(["validate", str(p), "export.opset=18"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].export.opset: opset 18 is above 17" in err and "(from override 'export.opset=18')" in err
    assert main(["validate", str(p), "export.precision=fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"]["stages"][0]["export"]["precision"] == "fp32"


def test_recipes_ls_and_cp(tmp_path, capsys):
    assert main(["recipes", "ls"]) == 0
    out = capsys.readouterr().out
    for name in builtin_recipes():
        assert name in out
    assert "export → check → engines" in out
    assert main(["recipes", "cp", "xavier-agx-fp16", str(tmp_path)]) == 0
    copied = tmp_path / "xavier-agx-fp16.yaml"
    assert copied.read_bytes() == builtin_recipes()["xavier-agx-fp16"].read_bytes()
    assert main(["recipes", "cp", "xavier-agx-fp16", str(copied)]) == 2          # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert main(["recipes", "cp", "xavier-agx-fp17", str(tmp_path / "n.yaml")]) == 2
    assert "did you mean 'xavier-agx-fp16'" in capsys.readouterr().err
    assert main(["validate", str(copied)]) == 0


def test_build_json_mode_reports_a_recipe_error_as_one_object(tmp_path, capsys):
    p = write(tmp_path, GOOD)
    assert main(["build", str(p), "export.opset=19", "--out", str(tmp_path / "o"), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "error" and len(out["errors"]) == 1 and "opset 19 is above 17" in out["errors"][0]
    assert not (tmp_path / "o").exists()          # nothing loaded, nothing written


def test_recipes_cp_refuses_a_missing_parent_folder(tmp_path, capsys):
    """Issue 26 #13: `recipes cp NAME typo/dir/my.yaml` created the missing folders silently."""
    dest = tmp_path / "typo" / "deeper" / "my.yaml"
    assert main(["recipes", "cp", "xavier-agx-fp16", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dest.parent) in err and "does not exist" in err
    assert not (tmp_path / "typo").exists()
