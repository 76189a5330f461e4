"""Runners of the built-in stages (export, check, engines); compress stages live in :mod:`medlite.compress`.

A runner is ``run(state: BuildState, index: int, options) -> StageResult`` (see
:mod:`medlite.pipeline.contract`); the registry (:mod:`medlite.recipes.registry`) names it as
``"module:function"`` so it is imported only when the stage runs.
"""
