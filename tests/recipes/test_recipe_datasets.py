"""Issue 26 #7: data-set names, splits and paths are checked at validation (validate / plan), not
inside a build; validate says it did not check the device memory budget."""
import json
import os
import shutil
from pathlib import Path

import pytest

from medlite.cli import main
from medlite.errors import RecipeError
from medlite.recipes import load_recipe

from recipe_helpers import GOOD, write

FIXTURE = Path(__file__).resolve().parents[1] / "evaluation" / "fixtures" / "vqa_rad.json"


def with_data(evaluation: str, calibration: str = "") -> str:
    return GOOD.replace("stages:", (calibration and f"calibration: {calibration}\n")
                        + f"evaluation: {evaluation}\nstages:")


def test_a_misspelt_split_and_missing_paths_are_every_error_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, with_data("{dataset: builtin:micro-med-vqa, split: tset}",
                                  "{dataset: data/vqa_rad.json, images: data/images, split: train}"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    errors = e.value.errors
    assert any(m.startswith("evaluation.split: builtin:micro-med-vqa has the splits train, test, all, not 'tset' "
                            "(did you mean 'test'?)") for m in errors), errors
    assert any(m.startswith("calibration.dataset: data/vqa_rad.json: no such data-set file or folder "
                            f"(relative paths are read from the folder medlite runs in, {tmp_path})")
               for m in errors), errors
    assert any(m.startswith("calibration.images: data/images: no such images folder") for m in errors), errors
    assert all("(line " in m for m in errors), errors          # YAML path and line, as every recipe error
    # through the CLI: validate and plan both refuse, before any model is looked at
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.split" in err and "calibration.dataset" in err and "Traceback" not in err
    cache = tmp_path / "cache"            # an empty cache: the recipe is refused before any model is looked for
    assert main(["--cache-dir", str(cache), "plan", str(p), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "error" and any("evaluation.split" in m for m in out["errors"])
    assert not cache.exists()


def test_paths_resolve_like_the_build_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "images").mkdir(parents=True)
    shutil.copyfile(FIXTURE, tmp_path / "data" / "vqa_rad.json")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    p = write(recipes, with_data("{dataset: data/vqa_rad.json, images: data/images, split: test}"))
    monkeypatch.chdir(tmp_path)
    r = load_recipe(p).recipe                                   # found from the current folder
    assert r.evaluation.dataset == "data/vqa_rad.json"
    monkeypatch.chdir(recipes)
    with pytest.raises(RecipeError, match="evaluation.dataset: data/vqa_rad.json: no such data-set file"):
        load_recipe(p)
    # an artifact's saved recipe is re-read without the file check (its data may have moved since)
    assert load_recipe(p, check_files=False).recipe == r
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"evaluation.split: unknown split 'tets' \(did you mean 'test'\?\)"):
        load_recipe(p, ["evaluation.split=tets"])
    assert os.path.isdir("data")


def test_validate_says_it_did_not_check_the_memory_budget(tmp_path, capsys):
    p = write(tmp_path, GOOD)
    assert main(["validate", str(p)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "budget" in ln]
    assert len(lines) == 1 and "not checked" in lines[0] and "medlite plan" in lines[0]
    assert main(["validate", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_checked"] is False
