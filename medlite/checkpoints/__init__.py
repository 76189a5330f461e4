"""Checkpoints: legacy TinyLLaVA / TinyLLaVA Factory / HF Llava → one canonical Llava model.

``load_model`` is the entry point; ``write_checkpoint`` writes a canonical model back out in a source
format; ``generate`` holds the PyTorch reference generation every later stage is compared against.
Importing this package does not import torch.
"""
from medlite.checkpoints.loader import inspect_checkpoint, load_model
from medlite.checkpoints.model import LoadedModel, SourceInfo
from medlite.checkpoints.writers import write_checkpoint

__all__ = ["LoadedModel", "SourceInfo", "inspect_checkpoint", "load_model", "write_checkpoint"]
