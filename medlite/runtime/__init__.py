"""Torch-free ONNX Runtime generation for medlite exports (onnxruntime + numpy + Pillow + tokenizers).

Nothing under ``medlite.runtime`` may import torch: it is what runs on a device.
"""
from medlite.runtime.config import RuntimeConfig
from medlite.runtime.vlm import OnnxVlm

__all__ = ["OnnxVlm", "RuntimeConfig"]
