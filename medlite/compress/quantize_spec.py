"""Declaration of the ``quantize`` stage (torch-free): INT8 Q/DQ and W8A8 SmoothQuant for TensorRT,
W4A16 GPTQ/AWQ for ONNX Runtime. The runner is :func:`medlite.compress.quantize_stage.run`."""
from __future__ import annotations

from medlite.recipes.options import QuantizeOptions
from medlite.recipes.planning import quantize_estimate, quantize_plan
from medlite.recipes.registry import Capabilities, Order, StageSpec, register_stage
from medlite.recipes.rules import quantize_rules

SPEC = register_stage(StageSpec(
    "quantize", QuantizeOptions, "INT8 Q/DQ (TensorRT) / W8A8 SmoothQuant / W4A16 GPTQ-AWQ (ONNX Runtime)",
    "medlite.compress.quantize_stage:run", quantize_plan, quantize_rules, estimate=quantize_estimate,
    # not caches_output: its output includes graph passes and module swaps for the export, not just weights
    caps=Capabilities(changes_weights=True, needs_calibration=True),
    order=Order(phase=30, why="quantize the final, distilled weights"),
    numerics=("torch", "transformers", "llmcompressor", "compressed-tensors", "onnxruntime")))
