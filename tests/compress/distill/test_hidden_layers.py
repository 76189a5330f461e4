"""Issue 26 #14: ``distill.hidden_mse: all`` names every decoder layer (resolved at run time), and the
shipped prune-attn-half recipe uses it; on the demo model it resolves to the list it replaced."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from medlite.compress.distill.options import DistillOptions, hidden_layers, plan
from medlite.errors import RecipeError
from medlite.recipes import load_recipe


def test_all_resolves_to_every_layer_and_lists_stay_as_given():
    assert hidden_layers(DistillOptions(hidden_mse="all"), 22) == list(range(22))
    assert hidden_layers(DistillOptions(hidden_mse=[3, 1]), 22) == [1, 3]
    assert DistillOptions(hidden_mse="ALL").hidden_mse == "all"
    sizes = SimpleNamespace(text={"num_layers": 22}, recipe=None)
    shown = plan(1, DistillOptions(hidden_mse="all", hidden_weight=4.0), sizes)[0]
    assert "hidden MSE on every decoder layer (22: layers 0-21)" in shown


def test_a_wrong_spelling_is_one_error_with_its_yaml_path(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(load_recipe("prune-attn-half").to_yaml().replace("hidden_mse: all", "hidden_mse: every"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert len(e.value.errors) == 1, e.value.errors            # no follow-on error about hidden_weight
    assert e.value.errors[0].startswith("stages[1].distill.hidden_mse: must be 'all' (every decoder layer) or a list "
                                        "of layer indices, got 'every' (line ")


def test_the_shipped_recipe_matches_every_layer_and_the_demo_list_is_unchanged():
    """prune-attn-half said "every decoder layer" but listed [0, 1] (two of the full-size model's 22)."""
    from medlite.demo.train import DemoRecipe

    opts = load_recipe("prune-attn-half").recipe.stage("distill")
    assert opts.hidden_mse == "all"
    assert hidden_layers(opts, 22) == list(range(22))                       # full-size: every layer
    assert hidden_layers(opts, DemoRecipe().text_layers) == [0, 1]            # demo: the list it replaced


def test_all_and_the_list_it_names_are_the_same_run(tiny_path, cctx, calib):
    """The stage resolves "all" on the student; the run key (checkpoint cache) equals the spelled-out list's."""
    from test_distill import OPTS, _pruned_state

    from medlite.compress.distill.stage import run

    opts = OPTS.model_copy(update={"steps": 2, "eval_every": 2, "checkpoint_every": 0, "hidden_weight": 1.0})
    runs = {}
    for spelling in ("all", [0, 1]):
        state = _pruned_state(tiny_path, cctx, calib)
        state.calibration = dataclasses.replace(calib, heldout=[])      # a CalibrationSet without held-out
        res = run(state, 1, opts.model_copy(update={"hidden_mse": spelling}))
        runs[str(spelling)] = res.manifest
    assert runs["all"]["hidden_mse_layers"] == runs["[0, 1]"]["hidden_mse_layers"] == [0, 1]
    assert runs["all"]["run_key"] == runs["[0, 1]"]["run_key"]
