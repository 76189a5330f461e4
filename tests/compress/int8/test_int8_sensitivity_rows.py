"""``sensitivity_rows``: validated in the recipe, and the number of held-out pairs the sensitivity pass
actually judges layers on (an even spread of the calibration held-out slice)."""
from __future__ import annotations

import pytest

from int8_fixtures import int8_state, quantize_recipe
from medlite.errors import RecipeError
from medlite.recipes import load_recipe
from medlite.recipes.options import QuantizeOptions



def test_sensitivity_rows_default_and_bad_value_named(tmp_path):
    assert QuantizeOptions().sensitivity_rows == 128
    p = tmp_path / "r.yaml"
    p.write_text(quantize_recipe(vision="int8", sensitivity_rows=512))
    assert load_recipe(p).recipe.stage("quantize").sensitivity_rows == 512
    p.write_text(quantize_recipe(vision="int8", sensitivity_rows=4))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert any(e.startswith("stages[0].quantize.sensitivity_rows: must be ≥ 8 (got 4)") for e in ei.value.errors), \
        ei.value.errors


class _Seen(Exception):
    pass


@pytest.mark.parametrize("rows", [8, 10_000])
def test_the_pass_judges_on_sensitivity_rows_pairs(rows, tiny_path, cctx, calib, monkeypatch):
    import medlite.compress.int8.stage as stage
    from medlite.checkpoints import load_model

    seen = []

    def fake_heldout(state, graph, fp32, heldout):
        seen.append(list(heldout))
        raise _Seen

    monkeypatch.setattr(stage, "_heldout", fake_heldout)
    state = int8_state(cctx, load_model(tiny_path, ctx=cctx), calib)
    with pytest.raises(_Seen):
        stage.apply_int8(state, 0, QuantizeOptions(vision="int8", sensitivity_rows=rows))
    pool = list(calib.heldout)
    assert len(pool) > 8
    got = [s.qid for s in seen[0]]
    if rows >= len(pool):
        assert got == [s.qid for s in pool]
    else:   # the calibration set's one subset rule (stratified, spread; tests/calibration/test_calibset.py)
        assert got == [s.qid for s in calib.heldout_subset(rows)] and len(got) == rows
        assert got != [s.qid for s in pool[:rows]]
