"""Evaluation for medlite: VQA dataset readers (VQA-RAD, SLAKE, LLaVA-Med, the built-in Micro
Med-VQA), answer scoring, and the ``medlite eval`` report.

Submodules are imported on first use of a name below, so ``import medlite.evaluation`` costs nothing.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_dataset": "vqa", "load_answers_jsonl": "vqa",
    "score": "scoring",
    "evaluate": "evaluate",
    "VqaSample": "samples", "CLOSED": "samples", "OPEN": "samples",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
