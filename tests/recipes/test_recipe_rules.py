"""Stage ordering rules, target capability checks and key=value overrides."""
import textwrap

import pytest
import yaml

from medlite.errors import RecipeError
from medlite.recipes import builtin_recipes, load_recipe
from medlite.recipes.loader import builtin_dir
from medlite.recipes.registry import STAGES, chain, order_errors

from recipe_helpers import GOOD, write


def recipe_with(stages_yaml: str, target="jetson-xavier-agx-32gb") -> str:
    return (f"name: t\nversion: 1.0.0\ntarget: {target}\nstages:\n"
            + textwrap.indent(textwrap.dedent(stages_yaml), "  "))


def errors_of(path, overrides=()):
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, list(overrides))
    return ei.value.errors


# -- ordering -------------------------------------------------------------------------------------
def test_check_before_export_is_rejected_naming_both(tmp_path):
    errs = errors_of(write(tmp_path, recipe_with("- check: {}\n- export: {}\n")))
    assert errs == ["stages[0].check needs an earlier 'export' stage (the gates compare the exported graphs "
                    "with the source model); stages[1].export comes after it"]


def test_engines_before_export_is_one_chain_error(tmp_path):
    errs = errors_of(write(tmp_path, recipe_with("- engines: {}\n- export: {}\n")))
    assert errs == ["stages[0].engines must come after stages[1].export "
                    "(export → engines: engines are built from the exported ONNX graphs)"]


def test_export_is_required_and_stages_appear_once(tmp_path):
    errs = errors_of(write(tmp_path, recipe_with("- export: {}\n- export: {precision: fp32}\n")))
    assert errs == ["stages[1].export: stage 'export' may appear at most 1 time(s); "
                    "found at stages[0].export, stages[1].export"]
    errs = errors_of(write(tmp_path, recipe_with("- engines: {}\n")))
    assert "stages: a 'export' stage is required (this version's artifacts are ONNX graphs)" in errs


def test_order_rules_are_data_and_cover_every_pair():
    # Every chain pair out of order is reported; in order it is not (tests the table, not a copy of it).
    CHAIN = chain()
    assert CHAIN == ("prune", "tokens", "distill", "quantize", "export", "engines")
    for a in range(len(CHAIN)):
        for b in range(a + 1, len(CHAIN)):
            first, second = CHAIN[a], CHAIN[b]
            names = sorted({first, second, "export"}, key=CHAIN.index)
            assert order_errors(list(enumerate(names))) == [], names
            bad = order_errors([(0, second), (1, first)])
            assert f"stages[0].{second} must come after stages[1].{first}" in " ".join(bad)
    needing = [n for n, s in STAGES.items() if s.order.needs_earlier]
    assert set(needing) == {"engines", "check"}


def test_a_registry_stage_without_runner_is_refused_at_validation(tmp_path, monkeypatch):
    """Every stage comes from the registry; an entry without a runner (not implemented) is refused."""
    import dataclasses

    from medlite.recipes import registry

    monkeypatch.setitem(registry.STAGES, "prune", dataclasses.replace(registry.STAGES["prune"], runner=None))
    text = recipe_with("- prune: {mlp: 0.25}\n- export: {}\n")
    text = text.replace("stages:", "calibration: {samples: 8}\nstages:")
    errs = errors_of(write(tmp_path, text))
    assert [e for e in errs if "not implemented" in e] == [
        "stages[0].prune: stage 'prune' is not implemented in this version (medlite 0.1.0); remove it to build "
        "this recipe (line 6)"]


def test_each_stage_owns_its_rules_plan_and_options():
    from medlite.recipes.base import Closed

    for name, spec in STAGES.items():
        assert spec.implemented and issubclass(spec.options, Closed), name
        assert spec.rules is not None and spec.plan is not None, name
        assert spec.runner.count(":") == 1, name
    assert STAGES["distill"].needs_source and all(STAGES[n].changes_weights for n in ("prune", "distill", "quantize"))
    assert not any(STAGES[n].changes_weights for n in ("export", "engines", "check"))


# -- targets --------------------------------------------------------------------------------------
def test_opset_above_target_max_names_path_and_target(tmp_path):
    errs = errors_of(write(tmp_path, recipe_with("- export: {opset: 18}\n")))
    assert errs == ["stages[0].export.opset: opset 18 is above 17, the highest ONNX opset TensorRT 8.5.2 on "
                    "jetson-xavier-agx-32gb accepts (line 5)"]


def test_int4_engines_are_rejected_with_the_ort_explanation(tmp_path):
    errs = errors_of(write(tmp_path, recipe_with("- export: {}\n- engines: {precision: int4}\n")))
    assert len(errs) == 1 and errs[0].startswith("stages[1].engines.precision: int4 engines are impossible on "
                                                 "jetson-xavier-agx-32gb")
    assert "MatMulNBits" in errs[0] and "onnxruntime >= 1.17" in errs[0] and "sm_72" in errs[0]


def test_int8_engines_need_a_quantize_stage(tmp_path):
    errs = errors_of(write(tmp_path, recipe_with("- export: {}\n- engines: {precision: int8}\n")))
    assert errs[0].startswith("stages[1].engines.precision: int8 engines need a quantize stage")


def test_calibration_and_evaluation_must_not_share_a_split(tmp_path):
    text = GOOD + "calibration: {split: test}\n"
    errs = errors_of(write(tmp_path, text))
    assert errs[0].startswith("calibration.split: same data set and split as evaluation")


# -- overrides ------------------------------------------------------------------------------------
def test_overrides_apply_by_stage_name_and_by_path(tmp_path):
    p = write(tmp_path, GOOD)
    res = load_recipe(p, ["export.precision=fp32", "stages[1].check.min_agreement=0.9", "check.max_mean_kl=null",
                          "evaluation.max_samples=7", "target=jetson-xavier-nx-16gb", "calibration.samples=16"])
    r = res.recipe
    assert r.stage("export").precision == "fp32"
    assert r.stage("check").min_agreement == 0.9 and r.stage("check").max_mean_kl is None
    assert r.evaluation.max_samples == 7 and r.target == "jetson-xavier-nx-16gb"
    assert r.calibration.samples == 16 and r.calibration.split == "train"
    # the saved resolved recipe carries the overridden values and re-validates to the same recipe
    again = yaml.safe_load(res.to_yaml())
    assert again["stages"][0]["export"]["precision"] == "fp32"
    p2 = write(tmp_path, res.to_yaml(), "resolved.yaml")
    assert load_recipe(p2).recipe == r


def test_override_errors_name_the_override(tmp_path):
    p = write(tmp_path, GOOD)
    errs = errors_of(p, ["export.precison=fp32", "nosuch.x=1", "engines.precision=fp16", "check.min_agreement",
                         "stages[5].check.x=1", "export.opset=abc"])
    assert errs[:4] == [
        "override 'nosuch.x=1': unknown key 'nosuch'",
        "override 'engines.precision=fp16': the recipe has no 'engines' stage (its stages: export, check)",
        "override 'check.min_agreement': expected KEY=VALUE, e.g. export.precision=fp32",
        "override 'stages[5].check.x=1': stages[5]: index out of range (2 item(s))"]
    assert ("stages[0].export.precison: unknown key (did you mean 'precision'?); allowed: precision, opset, "
            "components, decoder_graph (from override 'export.precison=fp32')") in errs
    assert "stages[0].export.opset: must be a valid integer, unable to parse string as an integer (got 'abc') " \
           "(from override 'export.opset=abc')" in errs
    assert len(errs) == 6


def test_ambiguous_stage_name_asks_for_a_path(tmp_path):
    from medlite.recipes.loader import apply_overrides

    data = {"stages": [{"check": {}}, {"export": {}}, {"check": {}}]}
    _, _, errs = apply_overrides(data, ["check.min_agreement=0.9"])
    assert errs == ["override 'check.min_agreement=0.9': 'check' appears 2 times; address one as "
                    "stages[0].check or stages[2].check"]


# -- shipped recipes ------------------------------------------------------------------------------
def test_every_shipped_recipe_validates_and_repo_copies_match():
    from pathlib import Path

    shipped = builtin_recipes()
    assert "xavier-agx-fp16" in shipped
    repo = Path(__file__).resolve().parents[2] / "recipes"
    # one source of truth: recipes/ in the repository is a link to the packaged folder, not a copy
    assert repo.is_symlink() and repo.resolve() == builtin_dir().resolve(), \
        "recipes/ must be a link to medlite/recipes_builtin (the packaged source of truth)"
    for name, path in shipped.items():
        r = load_recipe(path).recipe
        assert r.name == name, f"{path}: name must equal the file name"
        assert load_recipe(f"recipes/{name}.yaml").recipe == r   # the repository path people type
        assert load_recipe(name).recipe == r           # addressable by name too
