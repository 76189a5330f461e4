"""Synthetic lesions: where one is placed and how it is drawn (Micro Med-VQA's findings).

A lesion is a soft-edged disc with a bright or dark core and a thin rim of the opposite polarity,
placed wholly in one half of the image where it shows against the tissue around it. The same
rules draw the dataset's lesions (:mod:`medlite.demo.micro_vqa`) and the fresh lesions the
demo model's training draws at every step (:mod:`medlite.demo.vision`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Lesion:
    """What the answers say about a view's lesion; the exact place is drawn when rendering."""

    side: str     # "left" | "right" (of the image as displayed)
    bright: bool


@dataclass(frozen=True)
class Placement:
    """Where a lesion was drawn (pixel centre and radius in the rendered image)."""

    cx: float
    cy: float
    radius: float
    bright: bool


def _place_lesion(arr: np.ndarray, lesion: Lesion, rng: np.random.Generator) -> Placement:
    """Pick a centre on the requested side where the lesion shows against the tissue around it.

    The radius is 10–13 % of the image (at the demo model's 56 px / patch 8: about two patches
    across, 4–9 patch tokens touched). Smaller, patch-sized discs were tried first: a ViT trained
    for minutes from scratch on a dozen sources confused them with round anatomy (vertebrae, bowel
    gas) and held-out lesion detection stayed near 0.6–0.7. The whole disc (rim included) lies in
    one half of the image, so left/right is unambiguous. Bright lesions go where the local mean
    grey is 20–150, dark ones where it is 100–235 (the lesion sits in anatomy and is visible);
    when no candidate qualifies, one of the three closest is used.
    """
    size = arr.shape[0]
    radius = float(rng.uniform(0.10, 0.13) * size)
    margin = radius + 3.0
    half = size / 2.0
    xs = np.arange(margin, half - margin + 1e-6, 3.0)
    if lesion.side == "right":
        xs = size - xs
    ys = np.arange(margin, size - margin + 1e-6, 3.0)
    grey = arr.mean(axis=2)
    integral = np.pad(grey, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    r = int(round(radius))
    lo, hi = (20.0, 150.0) if lesion.bright else (100.0, 235.0)
    cands, dist = [], []
    for cy in ys:
        for cx in xs:
            y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r)
            x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r)
            m = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / ((y1 - y0) * (x1 - x0))
            cands.append((float(cx), float(cy)))
            dist.append(max(lo - m, 0.0, m - hi))
    dist = np.asarray(dist)
    good = np.flatnonzero(dist == 0) if (dist == 0).any() else np.argsort(dist, kind="stable")[:3]
    cx, cy = cands[int(good[rng.integers(len(good))])]
    return Placement(cx, cy, radius, lesion.bright)


def _draw_lesion(arr: np.ndarray, p: Placement, rng: np.random.Generator) -> np.ndarray:
    """Blend a soft-edged disc towards near-white (bright) or near-black (dark), with a thin rim
    of the opposite polarity.

    10 % of the underlying texture is kept (the lesion sits *in* the tissue). The rim (a "halo",
    2 px) is what sets the lesion apart from round anatomy of the same brightness; "bright" and
    "dark" always describe the core.
    """
    size = arr.shape[0]
    core = float(rng.uniform(225, 255)) if p.bright else float(rng.uniform(0, 20))
    rim = float(rng.uniform(0, 30)) if p.bright else float(rng.uniform(225, 255))
    outer = p.radius + 2.0
    y0, y1 = max(0, int(p.cy - outer) - 2), min(size, int(p.cy + outer) + 3)
    x0, x1 = max(0, int(p.cx - outer) - 2), min(size, int(p.cx + outer) + 3)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.hypot(xx - p.cx, yy - p.cy)
    a_core = (0.9 * np.clip((p.radius - d) / 1.5, 0.0, 1.0))[..., None]
    a_rim = (0.9 * np.clip((outer - d) / 1.0, 0.0, 1.0))[..., None] - a_core
    out = np.array(arr, dtype=np.float32, copy=True)
    patch = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = np.clip(patch * (1.0 - a_core - a_rim) + a_core * core + a_rim * rim, 0, 255)
    return out


def add_lesion(arr: np.ndarray, lesion: Lesion, rng: np.random.Generator) -> tuple[np.ndarray, Placement]:
    """Place and draw one lesion on a float ``[H, W, 3]`` 0..255 image (the generator's own rules).

    Used by :func:`medlite.demo.micro_vqa.render_view` and by the demo model's vision warm-up, which draws fresh lesions on
    lesion-free views so the tower sees many more lesion placements than the dataset holds.
    """
    placement = _place_lesion(arr, lesion, rng)
    return _draw_lesion(arr, placement, rng), placement
