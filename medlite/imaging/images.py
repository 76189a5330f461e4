"""Medical image loading: DICOM, NIfTI and ordinary raster files → 8-bit RGB ``PIL`` images.

Torch-free on purpose: the on-device runtime uses this module with numpy + Pillow + pydicom only.
Heavy or optional imports (pydicom, nibabel) happen inside the functions that need them.

Display rules (documented in docs/data.md):

* DICOM greyscale: stored values → Modality LUT (LUT sequence or rescale slope/intercept, also from
  enhanced multi-frame functional groups) → VOI (VOI LUT sequence, else the first window
  centre/width with its VOI LUT function) → inversion for MONOCHROME1 or Presentation LUT INVERSE.
  A file window that is *useless* (under 2 % of the pixels fall inside it, or 98 % of the pixels land
  in less than a fifth of the grey range) is replaced by a 0.5–99.5 % percentile window and reported
  as a warning; a missing window gets the percentile window and an informational note.
* DICOM colour: RGB as stored, YBR_FULL/YBR_FULL_422 converted to RGB by pydicom, PALETTE COLOR
  through its colour LUT.
* NIfTI: reoriented to RAS (closest canonical), one 2-D slice (default: the middle axial one,
  volume 0 of a 4-D series), percentile window, rotated so that anterior/superior is up.
* PNG/JPEG/TIFF: 8-bit modes are converted as they are; 16-bit / float greyscale gets the
  percentile window.
"""
from __future__ import annotations

import dataclasses
import functools
import glob as _glob
import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np

from medlite.imaging.dicom import DICOM_SUFFIXES, JPEG_EXTRA_HINT, decode_dicom, dicom_header
from medlite.imaging.pixels import (MODALITIES, PERCENTILES, DecodedImage,
                                        fixed_or_percentile, normalize_modality, to_rgb8)
from medlite.imaging.types import MedImage
from medlite.errors import DataError

__all__ = ["MODALITIES", "PERCENTILES", "DecodedImage", "JPEG_EXTRA_HINT", "decode_image", "load_image",
           "load_images", "normalize_modality", "sniff_kind"]

_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


# -- NIfTI ------------------------------------------------------------------------------------
def _decode_nifti(path: Path, axis: int, slice_index: Optional[int], volume: int, window) -> DecodedImage:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib errors)
        raise DataError(f"{path}: not a readable NIfTI file: {e}") from None
    shape = img.shape
    if len(shape) < 2 or len(shape) > 4:
        raise DataError(f"{path}: NIfTI data has shape {shape}; expected 2-D, 3-D or 4-D")
    if len(shape) == 2:
        data = np.asarray(img.dataobj, dtype=np.float64)[:, :, None]
    elif len(shape) == 3:
        data = np.asarray(img.dataobj, dtype=np.float64)
    else:
        if not 0 <= volume < shape[3]:
            raise DataError(f"{path}: volume {volume} out of range (4-D series has {shape[3]})")
        data = np.asarray(img.dataobj[..., volume], dtype=np.float64)
    if axis not in (0, 1, 2):
        raise DataError(f"{path}: axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis}")
    n = data.shape[axis]
    k = n // 2 if slice_index is None else slice_index
    if not 0 <= k < n:
        raise DataError(f"{path}: slice {k} out of range: slices count from 0 and axis {axis} has {n}, "
                        f"so --frame takes 0 to {n - 1}")
    plane = np.take(data, k, axis=axis)
    # RAS data: the first in-plane axis runs left→right, the second posterior→anterior (or
    # inferior→superior); rot90 puts the second axis vertically with anterior/superior up.
    out, desc = fixed_or_percentile(np.rot90(plane), window)
    notes = (f"slice {k} of {n} along axis {axis}" + (f", volume {volume}" if len(shape) == 4 else ""), desc)
    return DecodedImage(to_rgb8(out), "nifti", n, None, notes, ())


# -- PNG / JPEG / TIFF ------------------------------------------------------------------------
# Smaller than this on either side, an "image" is almost certainly not a scan (an icon, a 1x1 pixel).
MIN_SCAN_SIDE = 8


def _open_raster(path: Path):
    """``Image.open`` with one-line errors: unreadable files and Pillow's decompression-bomb guard
    (a header claiming e.g. 60000 x 60000 pixels) name the file and the limit instead of a traceback."""
    import re

    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        claims = f"{int(found.group(1)):,} pixels" if found else "more pixels than allowed"
        limit = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
        raise DataError(f"{path}: its header claims {claims}, over the {limit:,}-pixel limit images are decoded "
                        f"up to (a guard against decompression bombs); downscale the image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image (DICOM, NIfTI, PNG, JPEG or TIFF): {e}") from None


def _hu_window_warning(window, what: str, effect: str) -> tuple:
    """A (centre, width) window is given in Hounsfield units (CT presets); on an image without an HU
    rescale it cuts arbitrary values: say so (empty when no explicit window was given)."""
    if not isinstance(window, tuple):
        return ()
    c, w = window
    return (f"window C{c:g}/W{w:g} is in Hounsfield units, but this is {what}, not CT (no HU rescale): "
            f"{effect}",)


def _decode_raster(path: Path, frame: Optional[int], window) -> DecodedImage:
    from PIL import ImageOps

    img = _open_raster(path)
    with img:
        n = int(getattr(img, "n_frames", 1))
        warns: list = []
        if frame is not None:
            if not 0 <= frame < n:
                raise DataError(f"{path}: frame {frame} out of range: frames (pages) count from 0 and the file "
                                f"has {n}, so --frame takes 0 to {n - 1}")
            img.seek(frame)
        elif n > 1:
            warns.append(f"page 1 of {n} used (a multi-page file; --frame N picks another, counting from 0)")
        try:
            img = ImageOps.exif_transpose(img) if frame is None else img.copy()
            notes: tuple = ()
            kind = f"a {path.suffix.lstrip('.').upper() or 'raster'} image"
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                out, desc = fixed_or_percentile(np.asarray(img, dtype=np.float64), window)
                rgb, notes = to_rgb8(out), (f"{img.mode} image: {desc}",)
                warns += _hu_window_warning(window, kind, "it was applied to the stored pixel values")
            else:
                warns += _hu_window_warning(window, f"{kind} with 8-bit pixels",
                                            "the window was not applied (shown as stored)")
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    warns.append("alpha channel dropped: transparent pixels keep their stored colour "
                                 "(not composited on a background)")
                rgb = img.convert("RGB")
        except OSError as e:  # truncated files fail lazily, at decode time
            raise DataError(f"{path}: cannot decode image: {e}") from None
    return DecodedImage(rgb, "raster", n, None, notes, tuple(warns))


# -- dispatch ---------------------------------------------------------------------------------
def sniff_kind(path: Path) -> str:
    """"dicom", "nifti" or "raster" from the file's content (magic bytes), then its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":  # gzip: NIfTI if the decompressed header says so
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(352)
        except OSError:
            pass
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] in (b"n+2\0", b"ni2\0"):
        return "nifti"
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    return "raster"


def decode_image(path, *, frame: Optional[int] = None, axis: int = 2, slice_index: Optional[int] = None,
                 volume: int = 0, window="auto") -> DecodedImage:
    """Decode one file into a :class:`DecodedImage` (image + notes + warnings).

    ``frame`` picks a DICOM frame / TIFF page (default: the middle DICOM frame, the first page) or,
    for NIfTI, the slice when ``slice_index`` is not given; ``axis``/``slice_index``/``volume`` pick a
    NIfTI slice; ``window`` is "auto" (the file's VOI,
    replaced when unusable), "file" (the file's VOI or an error), "percentile", or a
    ``(centre, width)`` tuple in modality units (e.g. Hounsfield units for CT).
    """
    if isinstance(window, (tuple, list)):
        if len(window) != 2 or not float(window[1]) > 1:
            raise DataError(f"window must be (centre, width) with width > 1, got {window!r}")
        window = (float(window[0]), float(window[1]))
    elif window not in ("auto", "file", "percentile"):
        raise DataError(f"window must be 'auto', 'file', 'percentile' or (centre, width), got {window!r}")
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder; use load_images() for folders and globs")
    kind = sniff_kind(p)
    if kind == "dicom":
        d = decode_dicom(p, frame, window)
        if d.modality != "CT":
            mod = d.modality or "unknown"
            what = f"{'an' if mod in ('MR', 'NM', 'unknown') else 'a'} {mod} image"
            d = dataclasses.replace(d, warnings=d.warnings + _hu_window_warning(
                window, what, "its values are not HU, so the window does not show what it shows on CT"))
    elif kind == "nifti":
        d = _decode_nifti(p, axis, frame if slice_index is None else slice_index, volume, window)
    else:
        d = _decode_raster(p, frame, window)
    return _with_size_warning(d)


def _with_size_warning(d: DecodedImage) -> DecodedImage:
    w, h = d.image.size
    if min(w, h) >= MIN_SCAN_SIDE:
        return d
    return dataclasses.replace(d, warnings=d.warnings + (
        f"the image is only {w}x{h} pixels: almost certainly not a scan (the model sees it scaled up)",))


def load_image(path, *, frame: Optional[int] = None, axis: int = 2, slice_index: Optional[int] = None,
               volume: int = 0, window="auto", ctx=None):
    """Load a DICOM / NIfTI / PNG / JPEG / TIFF file as an 8-bit RGB ``PIL.Image``.

    Windowing fallbacks that change what the model sees are reported through ``ctx.warn`` when a
    run context is given (use :func:`decode_image` to get them as data).
    """
    d = decode_image(path, frame=frame, axis=axis, slice_index=slice_index, volume=volume, window=window)
    if ctx is not None:
        for w in d.warnings:
            ctx.warn(f"{path}: {w}")
    return d.image


def _expand(pattern: str) -> tuple[list[Path], Path]:
    """Files named by a file path, a folder (recursive) or a glob, plus the base for image ids."""
    p = Path(pattern).expanduser()
    if p.is_file():
        return [p], p.parent
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts)]
        return [f for f in files if _is_image_name(f)], p
    if _glob.has_magic(pattern):
        files = [Path(f) for f in sorted(_glob.glob(os.path.expanduser(pattern), recursive=True))]
        if not files:
            raise DataError(f"{pattern}: no files match this glob")
        base = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
        return [f for f in files if f.is_file()], base
    raise DataError(f"{pattern}: no such file or folder")


def _is_image_name(f: Path) -> bool:
    name = f.name.lower()
    return (f.suffix.lower() in DICOM_SUFFIXES | _RASTER_SUFFIXES or name.endswith(_NIFTI_SUFFIXES)
            or "." not in name)  # DICOM files often have no extension


def load_images(path_or_glob, *, expand_frames: bool = False, max_frames: Optional[int] = None,
                modality: Optional[str] = None, region: str = "unknown", ctx=None) -> list[MedImage]:
    """Every image under a file, folder (recursive, hidden files skipped) or glob, as MedImages.

    Loading is lazy: each :class:`MedImage` decodes on ``load()``. ``image_id`` is the path relative
    to the folder/glob base, so frames of one file share it. With ``expand_frames`` multi-frame
    DICOM/TIFF files contribute one MedImage per frame (evenly spaced, at most ``max_frames``).
    ``modality`` overrides the DICOM header (PNG/NIfTI files are "unknown" without it).
    """
    files, base = _expand(str(path_or_glob))
    if not files:
        raise DataError(f"{path_or_glob}: no image files found")
    out: list[MedImage] = []
    for f in files:
        kind = sniff_kind(f)
        mod, n, color = "unknown", 1, False
        if kind == "dicom":
            mod, n, color = dicom_header(f)
        elif kind == "raster":
            n, color = _raster_header(f)
        if modality:
            mod = normalize_modality(modality)
        image_id = f.relative_to(base).as_posix() if f.is_relative_to(base) else f.as_posix()
        frames: list = [None]
        if expand_frames and n > 1:
            k = n if max_frames is None else max(1, min(n, max_frames))
            frames = sorted({int(round(i * (n - 1) / max(k - 1, 1))) for i in range(k)})
        for fr in frames:
            out.append(MedImage(image_id=image_id, modality=mod, region=region, source=str(f),
                                loader=functools.partial(load_image, f, frame=fr, ctx=ctx),
                                frame=fr, is_color=color))
    return out


def _raster_header(path: Path) -> tuple[int, bool]:
    """(frames, is_color) of a PNG/JPEG/TIFF from its header (Pillow decodes lazily)."""
    with _open_raster(path) as img:
        return int(getattr(img, "n_frames", 1)), img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV")
