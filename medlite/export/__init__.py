"""ONNX export of the canonical model: ``vision.onnx``, ``embed.onnx``, ``decoder.onnx`` + runtime config.

See docs/export.md for the graph interfaces, the dummy-slot KV convention, precision variants and
TensorRT 8.5 constraints. Importing this package imports torch (the runtime, ``medlite.runtime``,
does not).
"""
from medlite.export.api import ExportResult, export_onnx

__all__ = ["ExportResult", "export_onnx"]
