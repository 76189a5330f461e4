"""Pixel-value helpers shared by the image decoders: the modality vocabulary, windowing to [0, 1],
8-bit RGB conversion and the :class:`DecodedImage` record. Torch-free (numpy + Pillow only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

MODALITIES = ("CT", "MR", "CR", "US", "NM", "fundus", "pathology")

# DICOM (0008,0060) Modality codes → the vocabulary. CR stands for every projection radiograph.
_DICOM_MODALITY = {
    "CT": "CT", "MR": "MR", "CR": "CR", "DX": "CR", "RG": "CR", "MG": "CR", "RF": "CR",
    "XA": "CR", "US": "US", "NM": "NM", "PT": "NM", "OP": "fundus", "SM": "pathology",
}

PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded 2-D image plus what was done to it.

    ``warnings`` are numerics-changing fallbacks the user should hear about (``ctx.warn``);
    ``notes`` are informational (which window was used, which frame was picked).
    """

    image: "object"                  # PIL.Image.Image, mode RGB, 8 bit
    kind: str                        # "dicom" | "nifti" | "raster"
    n_frames: int = 1
    modality: Optional[str] = None   # vocabulary label when the file says so (DICOM)
    notes: tuple = ()
    warnings: tuple = ()


def normalize_modality(code: Optional[str]) -> str:
    """Map a DICOM Modality code (or a dataset label such as "X-Ray", "MRI") to the vocabulary."""
    if not code:
        return "unknown"
    c = str(code).strip()
    if c in MODALITIES:
        return c
    up = c.upper().replace("-", "").replace(" ", "")
    aliases = {"MRI": "MR", "XRAY": "CR", "XR": "CR", "ULTRASOUND": "US", "FUNDUS": "fundus",
               "PATHOLOGY": "pathology", "HISTOLOGY": "pathology", "PET": "NM"}
    return _DICOM_MODALITY.get(up) or aliases.get(up, "unknown")


# -- windowing --------------------------------------------------------------------------------
def percentile_window(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Map ``values`` to [0, 1] with a 0.5–99.5 % percentile window; returns (out, description)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(v, PERCENTILES)
    if hi <= lo:  # very sparse images (mostly one value): fall back to the full range
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros_like(v), f"constant image (all {lo:g})"
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0), f"percentile window {lo:g}..{hi:g}"


def fixed_or_percentile(values: np.ndarray, window) -> tuple[np.ndarray, str]:
    """A caller-given (centre, width) window, else the percentile window."""
    if isinstance(window, tuple):
        c, w = window
        return linear_window(values, c, w), f"given window C{c:g}/W{w:g}"
    return percentile_window(values)


def linear_window(values: np.ndarray, center: float, width: float,
                  function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing of modality values to [0, 1] (LINEAR/LINEAR_EXACT/SIGMOID)."""
    v = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (v - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((v - center) / width + 0.5, 0.0, 1.0)
    return np.clip((v - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def window_is_useless(out: np.ndarray) -> Optional[str]:
    """Why a window maps the image to (almost) nothing useful, or None when it is fine.

    Useless means: fewer than 2 % of the pixels fall strictly inside the window (everything is
    clipped black/white), or 98 % of the pixels land in less than a fifth of the grey range.
    """
    inside = float(np.mean((out > 0.0) & (out < 1.0)))
    if inside < 0.02:
        return f"only {inside:.1%} of the pixels fall inside it"
    p1, p99 = np.percentile(out, (1, 99))
    if p99 - p1 < 0.2:
        return f"98% of the pixels map into {p99 - p1:.1%} of the grey range"
    return None


def to_rgb8(unit: np.ndarray):
    """[0, 1] greyscale (H, W) or colour (H, W, 3) → 8-bit RGB ``PIL.Image``."""
    from PIL import Image

    a = np.clip(np.rint(np.asarray(unit, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB")
