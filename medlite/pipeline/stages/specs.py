"""Declarations of the built-in non-compress stages (torch-free): ``export``, ``engines``, ``check``.

Their runners live next to this module (:mod:`.export`, :mod:`.engines`, :mod:`.check`) and are
imported only when they run.
"""
from __future__ import annotations

from medlite.recipes.options import CheckOptions, EnginesOptions, ExportOptions
from medlite.recipes.planning import check_plan, engines_plan, export_estimate, export_plan
from medlite.recipes.registry import Capabilities, Order, StageSpec, register_stage
from medlite.recipes.rules import check_rules, engines_rules, export_rules

GRAPHS_WHY = "the gates compare the exported graphs with the source model"

EXPORT = register_stage(StageSpec(
    "export", ExportOptions, "vision / embed / decoder ONNX graphs + runtime config",
    "medlite.pipeline.stages.export:run", export_plan, export_rules, estimate=export_estimate,
    caps=Capabilities(writes_graphs=True),
    order=Order(phase=40, why="export writes the compressed weights",
                required="this version's artifacts are ONNX graphs"),
    numerics=("torch", "transformers", "onnx")))
ENGINES = register_stage(StageSpec(
    "engines", EnginesOptions, "TensorRT 8.5 build bundle (engines are built on the device)",
    "medlite.pipeline.stages.engines:run", engines_plan, engines_rules,
    caps=Capabilities(reads_graphs=True),
    order=Order(phase=50, why="engines are built from the exported ONNX graphs",
                needs_earlier=(("writes_graphs", "engines are built from the exported ONNX graphs"),))))
CHECK = register_stage(StageSpec(
    "check", CheckOptions, "accuracy gates against the source model on the held-out split",
    "medlite.pipeline.stages.check:run", check_plan, check_rules,
    caps=Capabilities(needs_references=True, gate=True, reads_graphs=True),
    order=Order(needs_earlier=(("writes_graphs", GRAPHS_WHY),)),
    numerics=("onnxruntime",)))
