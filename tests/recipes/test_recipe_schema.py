"""Recipe schema: closed models, every error at once, each with its YAML path and line."""
import pytest

from medlite.errors import RecipeError
from medlite.recipes import load_recipe
from medlite.recipes.loader import format_path, parse_path

from recipe_helpers import GOOD, write


def errors_of(path, overrides=()):
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, list(overrides))
    return ei.value.errors


def test_good_recipe_loads_with_defaults(tmp_path):
    r = load_recipe(write(tmp_path, GOOD)).recipe
    assert [s.name for s in r.stages] == ["export", "check"]
    assert r.stage("export").components == ["vision", "embed", "decoder"]
    assert r.stage("check").min_agreement == 0.99
    assert r.stage("check").max_closed_acc_drop == 1.0           # default filled in
    assert r.evaluation.split == "test" and r.calibration is None
    d = r.to_dict()
    assert d["stages"][0] == {"export": {"precision": "fp16", "opset": 17,
                                         "components": ["vision", "embed", "decoder"]}}


def test_three_mistakes_give_three_errors_with_paths(tmp_path):
    p = write(tmp_path, """\
        name: three-mistakes
        version: 1.0.0
        target: jetson-xavier-agx-32gb
        stages:
          - export:
              precision: fp8
          - check:
              min_agreemnt: 0.99
              max_mean_kl: -1
    """)
    errs = errors_of(p)
    assert len(errs) == 3, errs
    assert errs[0].startswith("stages[0].export.precision: must be one of fp32, fp16 (got 'fp8')") and "(line 6)" in errs[0]
    assert errs[1].startswith("stages[1].check.min_agreemnt: unknown key (did you mean 'min_agreement'?)")
    assert "(line 8)" in errs[1]
    assert errs[2].startswith("stages[1].check.max_mean_kl: must be ≥ 0 (got -1)") and "(line 9)" in errs[2]


def test_group_size_message_matches_the_documented_form(tmp_path):
    p = write(tmp_path, GOOD.replace("  - export:", "  - quantize:\n      group_size: 48\n  - export:"))
    errs = errors_of(p)
    assert any(e.startswith("stages[0].quantize.group_size: must be one of 32, 64, 128 (got 48)") for e in errs), errs
    # every problem at once: the bad value, the missing calibration set, and nothing to quantize
    assert any(e.startswith("calibration: required by stages[0].quantize") for e in errs), errs


def test_top_level_errors_unknown_key_target_and_version(tmp_path):
    p = write(tmp_path, """\
        name: Has Spaces
        version: 1.0
        target: jetson-xavier-agx-32g
        stagse: []
        stages:
          - export: {}
    """)
    errs = errors_of(p)
    text = "\n".join(errs)
    assert "name: must be lower-case" in text
    assert "version: must be a semantic version string like 1.0.0, got 1.0" in text
    assert "target: unknown target 'jetson-xavier-agx-32g' (did you mean 'jetson-xavier-agx-32gb'?)" in text
    assert "stagse: unknown key (did you mean 'stages'?)" in text
    assert len(errs) == 4


def test_unknown_stage_name_suggests_the_close_one(tmp_path):
    p = write(tmp_path, GOOD + "  - quantise: {method: int8}\n")
    errs = errors_of(p)
    assert errs == ["stages[2].quantise: unknown key (did you mean 'quantize'?); allowed: prune, tokens, distill, "
                    "quantize, export, engines, check (line 10)"]


def test_stage_entry_with_two_keys_is_named(tmp_path):
    p = write(tmp_path, GOOD + "  - {engines: {}, check: {}}\n")
    errs = errors_of(p)
    assert len(errs) == 1 and errs[0].startswith("stages[2]: must have exactly one key") and "got 2: engines, check" in errs[0]


def test_shorthand_and_null_stage_mean_defaults(tmp_path):
    p = write(tmp_path, """\
        name: short
        version: 0.1.0
        target: jetson-xavier-nx-8gb
        stages:
          - export
          - check:
    """)
    r = load_recipe(p).recipe
    assert r.stage("export").precision == "fp16" and r.stage("check").min_vision_cosine == 0.999


def test_duplicate_yaml_keys_are_errors(tmp_path):
    p = write(tmp_path, GOOD.replace("opset: 17", "opset: 17\n      opset: 16"))
    errs = errors_of(p)
    assert errs == ["stages[0].export.opset: duplicate key (line 8)"]


def test_agreement_as_percentage_is_explained(tmp_path):
    errs = errors_of(write(tmp_path, GOOD.replace("0.99", "99.5")))
    assert errs == ["stages[1].check.min_agreement: must be a fraction between 0 and 1 (0.995 means 99.5 %), "
                    "got 99.5 (line 9)"]


def test_yaml_syntax_error_names_the_line(tmp_path):
    errs = errors_of(write(tmp_path, GOOD + "  - check: {min_agreement: [\n"))
    assert len(errs) == 1 and errs[0].startswith("line 11, column 1: invalid YAML"), errs


def test_not_a_mapping(tmp_path):
    assert "must be a YAML mapping" in errors_of(write(tmp_path, "- export\n"))[0]


def test_path_round_trip():
    for text in ("stages[2].quantize.group_size", "check.min_agreement", "a[0][1].b"):
        assert format_path(parse_path(text)) == text
    with pytest.raises(ValueError):
        parse_path("stages[x].export")


def test_missing_recipe_names_the_shipped_ones(tmp_path):
    with pytest.raises(RecipeError) as ei:
        load_recipe(str(tmp_path / "nope.yaml"))
    assert "xavier-agx-fp16" in str(ei.value)
