"""``samples: N`` picks the same calibration rows in every stage that takes it (issue 28): the int8 and
int4 quantize stages and pruning are run through their entry points until they open their first
calibration forward loop, and the rows they hand it are compared; distill's held-out slice and int8's
sensitivity rows come from the same rule on the held-out pairs (tests/compress/int8/
test_int8_sensitivity_rows.py follows the int8 side through a whole sensitivity pass)."""
from __future__ import annotations

import pytest

from compress_state import make_state
from medlite.checkpoints import load_model

N = 10


class _Rows(Exception):
    """Raised by the fake forward loop: the stage has chosen its rows; nothing more needs to run."""


def _rows_of(run, tiny_path, cctx, calib, monkeypatch) -> list[str]:
    state = make_state(cctx, load_model(tiny_path, ctx=cctx), calib)
    seen = []

    def first_loop(*, samples=None, **_kw):
        seen.append(list(calib.samples) if samples is None else list(samples))
        raise _Rows

    monkeypatch.setattr(state, "forward_loop", first_loop)
    with pytest.raises(_Rows):
        run(state)
    return [s.qid for s in seen[0]]


def test_every_stage_picks_the_same_rows_for_samples_n(tiny_path, cctx, calib, monkeypatch):
    from medlite.compress import quantize_stage
    from medlite.compress.prune.options import PruneOptions
    from medlite.compress.prune.stage import run as prune
    from medlite.recipes.options import QuantizeOptions

    stages = {
        "int8": lambda st: quantize_stage.run(st, 0, QuantizeOptions(vision="int8", llm="w8a8", samples=N)),
        "int4": lambda st: quantize_stage.run(st, 0, QuantizeOptions(llm="w4a16", samples=N)),
        "prune": lambda st: prune(st, 0, PruneOptions(mlp=0.25, samples=N)),
    }
    rows = {name: _rows_of(run, tiny_path, cctx, calib, monkeypatch) for name, run in stages.items()}
    want = [s.qid for s in calib.subset(N)]
    assert len(want) == N and len(calib.samples) > N
    assert rows == {name: want for name in stages}
    # stratified, not the first N: every modality of the set is there
    assert {s.modality for s in calib.subset(N)} == {s.modality for s in calib.samples}
    assert want != [s.qid for s in calib.samples[:N]]


def test_distill_heldout_slice_is_the_rule(tiny_path, cctx, calib):
    from medlite.compress.distill.options import DistillOptions
    from medlite.compress.distill.stage import _samples

    state = make_state(cctx, load_model(tiny_path, ctx=cctx), calib)
    n = len(calib.heldout) // 3
    train, held = _samples(state, DistillOptions(heldout_samples=n))
    assert [s.qid for s in held] == [s.qid for s in calib.heldout_subset(n)] and len(held) == n
    assert [s.qid for s in train] == [s.qid for s in calib.samples]     # distill trains on the whole set
