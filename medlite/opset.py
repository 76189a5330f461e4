"""The one opset rule: TensorRT 8.5 (the last TensorRT for Xavier, JetPack 5.1) parses ONNX opset ≤ 17.

Source: onnx-tensorrt branch 8.5-GA, docs/operators.md (``max_opset`` of ``medlite/data/tensorrt-8.5-ops.json``).
Recipe validation, the export stage, :func:`medlite.export.export_onnx`, the TensorRT operator check and
the Q/DQ rules all ask this module, so the limit and its message live in one place. Torch-free and
onnx-free: a model is anything with ``opset_import`` entries (``domain``, ``version``).
"""
from __future__ import annotations

from typing import Optional

TRT85_MAX_OPSET = 17     # TensorRT 8.5's ONNX parser
MIN_EXPORT_OPSET = 14    # the oldest opset the TorchScript exporter handles for these graphs here
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model) -> int:
    """The version of the default ONNX domain a model imports (0 when it imports none)."""
    return next((int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)


def opset_problem(opset: int, *, max_opset: int = TRT85_MAX_OPSET, tensorrt: str = "8.5",
                  where: str = "") -> Optional[str]:
    """None when ``opset`` parses on TensorRT ``tensorrt``; else the one-line reason.

    ``where`` names the device (``"on jetson-xavier-agx-32gb"``) when the caller knows it.
    """
    if int(opset) <= int(max_opset):
        return None
    on = f" {where}" if where else ""
    return f"opset {opset} is above {max_opset}, the highest ONNX opset TensorRT {tensorrt}{on} accepts"


def export_opset_problem(opset: int) -> Optional[str]:
    """None when :func:`medlite.export.export_onnx` can write ``opset``; else the reason (too old or too new)."""
    if int(opset) < MIN_EXPORT_OPSET:
        return (f"opset {opset} is not supported: use {MIN_EXPORT_OPSET}..{TRT85_MAX_OPSET} "
                f"(the TorchScript exporter here handles opset {MIN_EXPORT_OPSET} and later)")
    problem = opset_problem(opset)
    return f"opset {opset} is not supported: use {MIN_EXPORT_OPSET}..{TRT85_MAX_OPSET} ({problem})" if problem else None


def model_opset_problem(model, *, max_opset: int = TRT85_MAX_OPSET, tensorrt: str = "8.5") -> Optional[str]:
    """:func:`opset_problem` for the default-domain opset a model imports."""
    return opset_problem(default_opset(model), max_opset=max_opset, tensorrt=tensorrt)


__all__ = ["DEFAULT_DOMAINS", "MIN_EXPORT_OPSET", "TRT85_MAX_OPSET", "default_opset", "export_opset_problem",
           "model_opset_problem", "opset_problem"]
