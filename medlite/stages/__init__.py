"""Stage runners of ``medlite build``: one module per implemented registry stage.

A runner is ``run(state: BuildState, index: int, options) -> str``: it works inside
``state.work`` (the staging folder of the artifact), records what the manifest and report need in
``state``, and returns the one-line summary printed after ``✓ <stage>``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# stage name -> "module:function" (imported when the stage runs: export pulls in torch/onnx).
RUNNERS = {
    "export": "medlite.stages.export:run",
    "check": "medlite.stages.check:run",
    "engines": "medlite.stages.engines:run",
}


@dataclass
class BuildState:
    """Everything the stages of one build share (no global state)."""

    ctx: Any                          # medlite.context.RunContext
    recipe: Any                       # medlite.recipes.schema.Recipe
    target: Any                       # medlite.engines.targets.Target
    loaded: Any                       # medlite.checkpoints.LoadedModel
    work: Path                        # staging folder; becomes the artifact
    eval_samples: list = field(default_factory=list)
    calibration: Any = None
    metrics: dict = field(default_factory=dict)
    gates: list = field(default_factory=list)      # medlite.checks.Gate
    rows: list = field(default_factory=list)       # per-question check rows
    sections: dict = field(default_factory=dict)   # stage name -> JSON-able facts for manifest/report
    reference: Optional[Any] = None                # cached medlite.checks.TorchReference


def runner(name: str) -> Callable:
    """The run function of an implemented stage."""
    module, fn = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), fn)
