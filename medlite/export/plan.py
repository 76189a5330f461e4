"""How the export composes (filled by compress stages, consumed by the export stage): per-graph plans —
precision to trace in, module swaps during the trace, graph passes between trace and write
(``<output>_from_<input>(proto, PassContext)``), the runtime and the quantization record.

Lives in the export layer so that export never imports the build orchestration; the build contract
(:mod:`medlite.pipeline.contract`) re-exports these names for stages.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

# A module swap: called with the (export-dtype) model, returns a context manager that swaps modules
# for the duration of one graph's trace and restores them afterwards.
ModuleSwap = Callable[[Any], ContextManager]
# A graph pass: ``<output>_from_<input>(proto, ctx: PassContext) -> proto``.
GraphPass = Callable[[Any, "PassContext"], Any]

TENSORRT, ONNXRUNTIME = "tensorrt", "onnxruntime"


@dataclass
class PassContext:
    """What a graph pass may use besides the graph: which graph it is, the run context, the working
    model (for calibration inputs) and the build state (calibration set, forward loop)."""

    graph: str
    ctx: Any
    model: Any = None
    state: Any = None
    tmp_dir: Optional[Path] = None


@dataclass
class GraphPlan:
    """How one graph (vision / embed / decoder) is exported."""

    precision: Optional[str] = None          # float precision the graph is traced in (None: the export stage's)
    swaps: list = field(default_factory=list)     # [(name, ModuleSwap)]
    passes: list = field(default_factory=list)    # [(name, GraphPass)], after the standard passes
    runtime: str = TENSORRT                  # TENSORRT | ONNXRUNTIME
    runtime_reason: str = ""                 # why a graph is ONNX-Runtime only
    quantization: dict = field(default_factory=dict)   # record for medlite_runtime.json and the manifest


@dataclass
class ExportPlan:
    """Per-graph export plans, filled by compress stages, consumed by the export stage."""

    graphs: dict = field(default_factory=dict)    # graph name -> GraphPlan

    def graph(self, name: str) -> GraphPlan:
        """The plan of ``name`` (created empty on first use)."""
        return self.graphs.setdefault(name, GraphPlan())

    def swaps_for(self, name: str, model) -> ContextManager:
        """One context manager applying every swap registered for ``name``, in order."""
        stack = contextlib.ExitStack()
        for _, swap in self.graph(name).swaps:
            stack.enter_context(swap(model))
        return stack


def decoder_graph_choice(option: str, *, tensorrt_target: bool, decoder_runtime: str) -> str:
    """The export's ``decoder_graph`` for a recipe's option (medlite/export/fused_decoder.py).

    The fused decoder exists only for decoders that run on ONNX Runtime; ``fused`` for a decoder
    TensorRT builds is an error (also a validation rule). ``auto`` fuses on CPU targets only: a Jetson's
    ONNX-Runtime-only (INT4) decoder runs on the device's onnxruntime (the bundle pins 1.16.3, the last
    Python 3.8 aarch64 wheel), whose GroupQueryAttention lacks the inputs the fused graph uses (1.19.2
    rejects it, measured), so there ``auto`` keeps the traced graph and ``fused`` is an explicit choice.
    A TensorRT target's graphs therefore stay byte for byte the traced ones unless a recipe says otherwise.
    """
    if option == "fused" and tensorrt_target and decoder_runtime != ONNXRUNTIME:
        raise ValueError("decoder_graph fused needs a decoder that runs on ONNX Runtime (a CPU target or "
                         "llm: w4a16); this decoder goes to TensorRT")
    if option == "auto":
        return "plain" if tensorrt_target else "auto"
    return option


__all__ = ["ExportPlan", "GraphPass", "GraphPlan", "ModuleSwap", "ONNXRUNTIME", "PassContext", "TENSORRT", "decoder_graph_choice"]
