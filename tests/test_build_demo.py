"""Every shipped recipe, built end to end on the built-in demo model (what `make demo` runs).

The demo model is trained once per machine and cached in the medlite cache (``$MEDLITE_CACHE`` or
the user cache dir), exactly as ``medlite build`` without ``--model`` does.
"""
import json
from pathlib import Path

import pytest

from medlite.cli import main
from medlite.recipes import builtin_recipes, load_recipe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_shipped_recipe_builds_passes_and_verifies_on_the_demo_model(name, tmp_path, capsys):
    out = tmp_path / "artifacts"
    rc = main(["build", name, "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["status"] == "passed", res.get("failed_gates") or res
    path = Path(res["artifact"])
    recipe = load_recipe(name).recipe
    assert path.parent.name == recipe.name and res["version"].startswith(recipe.version + "+")
    assert path.parent.parent.name == "micro-tinyllava-med"  # named for the model, not its cache key
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source"]["path"] == "builtin:demo-model" and manifest["source"]["files"]
    gates = {g["name"]: g for g in res["gates"]}
    if recipe.stage("check") is not None:
        assert all(g["passed"] is not False for g in gates.values()), gates
        # the gates ran on the held-out test split, not on a handful of questions
        assert res["metrics"]["n"] >= 20 and res["metrics"]["n_closed"] >= 10
    if recipe.stage("engines") is not None:
        assert (path / "engines" / "build_engines.sh").is_file()
        assert json.loads((path / "engines" / "engines.json").read_text())["memory"]["fits"]
    # The artifact verifies: files re-hashed, gates re-run with the runtime, metrics reproduced.
    assert main(["verify", str(path), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["files_ok"]
    # A second build with identical inputs is reused, not recomputed.
    assert main(["build", name, "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused"] and again["version"] == res["version"]
