"""Image preprocessing shared by the PyTorch reference and the ONNX runtime (numpy + Pillow only).

Reproduces the source checkpoint's processor exactly:

* legacy TinyLLaVA / LLaVA ``image_aspect_ratio: pad``: pad to a square with the mean colour
  (``expand2square(img, tuple(int(x * 255) for x in image_mean))``), then the tower's processor;
* SigLIP processor: bicubic resize straight to ``size × size``, rescale by 1/255, normalise;
* CLIP processor: bicubic resize of the shortest edge, centre crop, rescale, normalise.

Resizing goes through Pillow, as transformers' image processors do, so results agree to float
rounding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}


@dataclass(frozen=True)
class ImageSpec:
    """How one image becomes ``pixel_values``. Stored in runtime configs and manifests."""

    size: int = 384
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pad_to_square: bool = True
    resample: str = "bicubic"
    rescale: float = 1 / 255
    resize_mode: str = "exact"  # "exact" (SigLIP) | "shortest_edge_center_crop" (CLIP)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, *, pad_to_square: bool) -> "ImageSpec":
        """Build a spec from a transformers ``preprocessor_config.json`` (SigLIP or CLIP)."""
        size = cfg.get("size", 384)
        crop = cfg.get("crop_size")
        if isinstance(size, dict) and "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            crop_px = int(crop["height"]) if isinstance(crop, dict) else int(crop or edge)
            mode, px = "shortest_edge_center_crop", crop_px
        else:
            px = int(size["height"]) if isinstance(size, dict) else int(size)
            mode = "exact"
        resample = {3: "bicubic", 2: "bilinear", 0: "nearest", 1: "lanczos"}.get(cfg.get("resample", 3), "bicubic")
        return cls(size=px, mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
                   std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))), pad_to_square=pad_to_square,
                   resample=resample, rescale=float(cfg.get("rescale_factor", 1 / 255)), resize_mode=mode)


def expand_to_square(img, background: tuple[int, int, int]):
    """Pad an RGB PIL image to a square, centred, filled with ``background`` (LLaVA's expand2square)."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _resize(img, spec: ImageSpec):
    resample = _RESAMPLE[spec.resample]
    if spec.resize_mode == "exact":
        return img.resize((spec.size, spec.size), resample=resample)
    # CLIP: shortest edge to `size`, then centre crop size×size.
    w, h = img.size
    short = min(w, h)
    nw, nh = (spec.size, round(h * spec.size / w)) if w == short else (round(w * spec.size / h), spec.size)
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    return img.crop((left, top, left + spec.size, top + spec.size))


def preprocess_one(img, spec: ImageSpec) -> np.ndarray:
    """One PIL image → float32 ``[3, size, size]``."""
    img = img.convert("RGB")
    if spec.pad_to_square:
        img = expand_to_square(img, tuple(int(x * 255) for x in spec.mean))
    img = _resize(img, spec)
    arr = np.asarray(img, dtype=np.float64) * spec.rescale
    arr = arr.astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def preprocess(images: Iterable | object, spec: ImageSpec) -> np.ndarray:
    """PIL image(s) → float32 ``pixel_values`` of shape ``[N, 3, size, size]``."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    return np.stack([preprocess_one(im, spec) for im in images])


def as_batch(images: Sequence) -> list:
    """Normalise a single image or a sequence to a list (helper for callers)."""
    return list(images) if isinstance(images, (list, tuple)) else [images]
