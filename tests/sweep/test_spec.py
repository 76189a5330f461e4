"""Sweep files: every problem at once with its YAML path; the axes' product and explicit variants; a
variant that breaks a recipe rule is invalid with the rule's message (no model, nothing built)."""
from __future__ import annotations

import pytest

from medlite.errors import RecipeError
from medlite.sweep.spec import axis_variants, load_sweep, value_text


def _write(tmp_path, text: str):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_product_and_explicit_variants(tmp_path):
    p = _write(tmp_path, """
name: t
recipe: xavier-agx-int8-vision
overrides: [calibration.samples=8]
axes:
  quantize.llm: [fp16, w8a8]
  quantize.vision: [fp16, int8]
variants:
  - {name: mine, overrides: [quantize.llm=w8a8, export.opset=16]}
""")
    s = load_sweep(p)
    names = [v.name for v in s.variants]
    assert names == ["llm-fp16_vision-fp16", "llm-fp16_vision-int8", "llm-w8a8_vision-fp16", "llm-w8a8_vision-int8",
                     "mine"]
    by = {v.name: v for v in s.variants}
    assert by["llm-w8a8_vision-int8"].overrides == ["calibration.samples=8", "quantize.llm=w8a8",
                                                    "quantize.vision=int8", "name=t.llm-w8a8_vision-int8"]
    r = by["mine"].resolved.recipe
    assert (r.name, r.stage("quantize").llm, r.stage("export").opset, r.calibration.samples) == ("t.mine", "w8a8", 16, 8)
    bad = by["llm-fp16_vision-fp16"]     # quantizes nothing: the recipe rule's own message, with its file
    assert not bad.valid and any("quantizes nothing" in e and e.startswith("xavier-agx-int8-vision.yaml") for e in bad.errors)
    assert all(v.valid for v in s.variants if v is not bad)
    assert by["mine"].key("m") != by["llm-w8a8_vision-int8"].key("m")
    assert by["mine"].key("m") != by["mine"].key("other-model")


def test_every_error_at_once_with_paths(tmp_path):
    p = _write(tmp_path, """
name: Bad Name
recipe: xavier-agx-int8-vision
axes:
  quantize.llm: []
variants:
  - {name: a, overrides: [], colour: red}
targets: [jetson-xavier-nx-8gb, nowhere]
bogus: 1
""")
    with pytest.raises(RecipeError) as e:
        load_sweep(p)
    text = "\n".join(e.value.errors)
    for part in ("name: must be lower-case", "(line 2)", "axes: quantize.llm: an axis needs at least one value",
                 "variants[0].colour: unknown key; allowed: name, overrides (line 7)",
                 "targets: unknown target(s) nowhere", "bogus: unknown key"):
        assert part in text, text
    assert len(e.value.errors) == 5


def test_axis_paths_checked_against_the_recipe(tmp_path):
    p = _write(tmp_path, """
name: t
recipe: xavier-agx-int8-vision
axes:
  quantize.lvm: [fp16]
  quantise.vision: [int8]
variants:
  - {name: a}
  - {name: a, overrides: [export.opset=16]}
""")
    with pytest.raises(RecipeError) as e:
        load_sweep(p)
    errs = e.value.errors
    assert any(x.startswith("axes.quantize.lvm:") and "did you mean 'llm'" in x and "(line 5)" in x for x in errs), errs
    assert any(x.startswith("axes.quantise.vision:") and "did you mean 'quantize'" in x for x in errs), errs
    assert any("'a' is used twice" in x for x in errs), errs


def test_recipe_relative_to_the_sweep_file_and_values(tmp_path):
    from medlite.recipes import builtin_recipes

    (tmp_path / "base.yaml").write_text(builtin_recipes()["xavier-agx-fp16"].read_text())
    s = load_sweep(_write(tmp_path, "name: t\nrecipe: base.yaml\naxes: {export.precision: [fp32, fp16]}\n"))
    assert s.recipe_path == tmp_path / "base.yaml"
    assert [v.resolved.recipe.stage("export").precision for v in s.variants] == ["fp32", "fp16"]
    assert [value_text(v) for v in (0.25, "int8", None, [1, 2], True)] == ["0.25", "int8", "null", "[1, 2]", "true"]
    assert axis_variants({"prune.mlp": [0.25, 0.5]}) == [("mlp-025", ["prune.mlp=0.25"]), ("mlp-05", ["prune.mlp=0.5"])]


def test_shipped_demo_sweep_loads():
    from medlite.recipes.loader import builtin_dir

    s = load_sweep(builtin_dir() / "sweeps" / "demo-precision.yaml")
    valid = [v for v in s.variants if v.valid]
    assert len(s.variants) == 5 and len(valid) == 4
    assert {v.resolved.recipe.stage("prune").mlp for v in valid} == {0.25, 0.5}
    assert s.spec.targets == ["jetson-xavier-agx-32gb", "jetson-xavier-nx-8gb", "cpu-x86_64"]
