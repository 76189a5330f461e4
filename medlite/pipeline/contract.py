"""The build contract: what a stage is given (:class:`BuildState`) and what it returns (:class:`StageResult`).

Two models, never confused:

* the **source** — the untouched checkpoint. Before the first stage that changes weights runs, its
  reference outputs on the evaluation split (answers, first-token logits, image embeddings) are
  computed once and cached by source hash + evaluation set (:mod:`medlite.pipeline.references`). Every
  gate compares against those references, never against the working model. Stages that need the
  source itself (distillation's teacher) ask for it with :meth:`BuildState.source_model`.
* the **working model** — what compress stages transform in place (prune, distill, quantize) and what
  export traces. It starts as the source's weights; when a later stage still needs the untouched
  source, it is a copy.

Export composes: compress stages do not write graphs themselves; they add to ``state.export_plan``
the module swaps to apply while tracing a graph (e.g. quantized ``Linear`` → ``MatMulNBits``), the
graph passes to run between trace and write (e.g. static Q/DQ insertion), each graph's runtime
(TensorRT or ONNX Runtime only, with the reason) and its precision/quantization record, which goes
into ``medlite_runtime.json`` and the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# Re-exported for stages: the export-plan types live in the export layer.
from medlite.export.plan import (ONNXRUNTIME, TENSORRT, ExportPlan, GraphPass, GraphPlan,  # noqa: F401
                                 ModuleSwap, PassContext)

__all__ = ["BuildState", "ExportPlan", "GraphPass", "GraphPlan", "ModuleSwap", "ONNXRUNTIME", "PassContext",
           "StageResult", "TENSORRT"]


@dataclass
class StageResult:
    """What one stage did: the printed line, what changed, bytes, and what goes into manifest and report.

    ``manifest`` must hold deterministic, JSON-able facts only (no timings, no temporary paths): it
    is hashed into the artifact, and so is ``summary`` (the manifest's and report's stage line): figures
    that differ between two builds of the same inputs (samples/s) go in ``note`` instead, which is
    printed and kept in ``build-info.json`` only. ``report`` is markdown for report.md. ``ok=False`` marks a stage
    that ran but failed one of its own checks (printed with ✗; the build fails).
    """

    summary: str
    changed: list = field(default_factory=list)
    bytes_before: Optional[int] = None
    bytes_after: Optional[int] = None
    manifest: dict = field(default_factory=dict)
    report: list = field(default_factory=list)
    ok: bool = True
    note: str = ""     # volatile (a speed): printed on the stage line and kept in build-info.json, never hashed

    def section(self) -> dict:
        """The manifest section of this stage."""
        out = dict(self.manifest)
        if self.changed:
            out["changed"] = list(self.changed)
        if self.bytes_before is not None:
            out["bytes_before"] = int(self.bytes_before)
        if self.bytes_after is not None:
            out["bytes_after"] = int(self.bytes_after)
        return out


@dataclass
class BuildState:
    """Everything the stages of one build share (no global state)."""

    ctx: Any                          # medlite.context.RunContext
    recipe: Any                       # medlite.recipes.schema.Recipe
    target: Any                       # medlite.engines.targets.Target
    work: Path                        # staging folder; becomes the artifact
    source: Any                       # medlite.pipeline.source.Source (references, lazy source model)
    model: Any = None                 # the working LoadedModel (compress stages change .model in place)
    eval_samples: list = field(default_factory=list)
    check_samples: list = field(default_factory=list)   # the questions the gates run on (stratified)
    references: Any = None            # medlite.pipeline.references.References of the source on check_samples
    calibration: Any = None           # medlite.calibration.calibset.CalibrationSet
    export_plan: ExportPlan = field(default_factory=ExportPlan)
    results: dict = field(default_factory=dict)    # "stages[i].name" -> StageResult
    metrics: dict = field(default_factory=dict)
    gates: list = field(default_factory=list)      # medlite.checks.Gate
    rows: list = field(default_factory=list)       # per-question check rows
    timings: dict = field(default_factory=dict)    # phase -> seconds (report only, not hashed)
    device: Any = None                # torch.device the stages compute on (None or cpu: the host, as before)
    gpu_peaks: dict = field(default_factory=dict)  # "stage/phase" -> peak CUDA bytes (empty on the CPU)

    def forward_loop(self, *, samples=None, batch_size: int = 8, description: str = "calibration forward",
                     equal_length: bool = False):
        """The framework's forward loop over the calibration samples (or ``samples``) for the working model."""
        from medlite.calibration.forward import ForwardLoop

        if samples is None:
            if self.calibration is None:
                from medlite.errors import DataError

                raise DataError("this stage needs the recipe's calibration section (medical image + question pairs)")
            samples = self.calibration.samples
        return ForwardLoop(self.model, samples, batch_size=batch_size, ctx=self.ctx, description=description,
                           equal_length=equal_length)

    def source_model(self):
        """The untouched source ``LoadedModel`` (e.g. a distillation teacher)."""
        return self.source.model()
