"""Medical image IO for medlite (torch-free): DICOM, NIfTI, PNG/JPEG/TIFF decoding to RGB, the
built-in image set shipped inside installed wheels, and the data types shared with datasets.

Only numpy, Pillow and (lazily) pydicom / nibabel: the on-device runtime imports this package.
Submodules are imported on first use of a name below, so ``import medlite.imaging`` costs nothing.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_image": "images", "load_images": "images", "decode_image": "images",
    "builtin_images": "builtin",
    "MedImage": "types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
