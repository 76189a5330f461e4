"""``make_state``: a BuildState around a working model for the prune / distill tests.

A module with its own name (not ``conftest``): ``from conftest import ...`` picks whichever
``conftest`` module another test folder imported first (tests/serve has one too).
"""
from __future__ import annotations

from types import SimpleNamespace


def make_state(ctx, loaded, calib, *, source=None, work=None, eval_samples=()):
    """A BuildState whose working model is ``loaded`` and whose source model is ``source``."""
    from medlite.pipeline.contract import BuildState

    src = SimpleNamespace(model=lambda: source)
    return BuildState(ctx=ctx, recipe=None, target=None, work=work, source=src, model=loaded,
                      calibration=calib, eval_samples=list(eval_samples))
