"""Calibration sets for medlite: image+question pairs chosen (stratified, image-disjoint from the
held-out set) to calibrate quantization and pruning.

Image loading lives in :mod:`medlite.imaging`, VQA datasets and scoring in :mod:`medlite.evaluation`,
the built-in demo model in :mod:`medlite.demo`. Submodules are imported on first use of a name below,
so ``import medlite.calibration`` costs nothing.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"build_calibration_set": "calibset", "CalibrationSet": "calibset"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
