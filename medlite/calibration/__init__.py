"""Medical data for medlite: image loading, the built-in image set, VQA datasets, scoring and
calibration sets.

Kept light and torch-free: the submodules are imported on first use of a name below, so that
``import medlite.calibration`` costs nothing (the on-device runtime imports only what it needs).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_image": "images", "load_images": "images", "decode_image": "images",
    "builtin_images": "builtin",
    "load_dataset": "vqa", "load_answers_jsonl": "vqa",
    "score": "scoring",
    "build_calibration_set": "calibset", "CalibrationSet": "calibset",
    "MedImage": "types", "VqaSample": "types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
