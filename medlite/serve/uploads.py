"""Uploaded scans for ``medlite serve``: size and pixel limits, decoding in a private temporary
folder (deleted before the request returns), and the image exactly as the model sees it.

Decoding is medlite's own (DICOM / NIfTI / PNG / JPEG / TIFF, the same windowing as ``medlite ask``
and the build's checks); preprocessing is :func:`medlite.preprocess.preprocess`, the function the
runtime feeds the vision graph with. Nothing here logs anything: file names and DICOM tags may
identify a patient.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from medlite.errors import DataError
from medlite.preprocess import ImageSpec, preprocess

# Window presets the page offers, in modality units (Hounsfield units for CT). "auto" is the file's
# own window (replaced by a percentile window when unusable): what `medlite ask` and the build use.
# CT values: Radiopaedia, "Windowing (CT)", https://radiopaedia.org/articles/windowing-ct
WINDOW_PRESETS: dict[str, tuple[str, object]] = {
    "auto": ("file window (as medlite ask)", "auto"),
    "percentile": ("0.5-99.5 % percentile", "percentile"),
    "ct-brain": ("CT brain C40/W80", (40.0, 80.0)),
    "ct-soft-tissue": ("CT soft tissue C40/W400", (40.0, 400.0)),
    "ct-lung": ("CT lung C-600/W1500", (-600.0, 1500.0)),
    "ct-bone": ("CT bone C400/W1800", (400.0, 1800.0)),
}
_SUFFIXES = (".nii.gz", ".dcm", ".dicom", ".ima", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class UploadError(DataError):
    """A rejected upload; ``status`` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server (defaults sized for a Jetson Xavier)."""

    max_upload_bytes: int = 64 * 1024 * 1024    # one file, as sent
    max_pixels: int = 25_000_000                # one 2-D image / frame (5000 x 5000)
    max_voxels: int = 64_000_000                # one NIfTI volume (decoded as float64: 512 MB)
    max_question_chars: int = 1000
    max_queue: int = 4                          # requests waiting behind the one being answered
    max_new_tokens: int = 32                    # as `medlite ask`
    # follow-up questions: the kept prompt-prefix KV caches of all sessions together (0: none kept);
    # medlite.runtime.prefix_cache.DEFAULT_MAX_BYTES
    prefix_cache_bytes: int = 512 * 1000 ** 2


@dataclass(frozen=True)
class DecodedUpload:
    """A decoded upload: the windowed 8-bit RGB image and what the page shows about it."""

    image: object            # PIL RGB, what the model is given (it preprocesses it)
    kind: str                # dicom | nifti | raster
    n_frames: int            # frames (DICOM/TIFF) or axial slices (NIfTI)
    frame: int               # the frame / slice shown and answered about
    modality: Optional[str]
    notes: tuple
    warnings: tuple


def display_name(filename: Optional[str]) -> str:
    """The upload's base name, printable and short (it is only echoed back, never logged)."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", Path(str(filename or "upload")).name)
    return (name or "upload")[:80]


def _suffix(filename: str) -> str:
    low = filename.lower()
    return next((s for s in _SUFFIXES if low.endswith(s)), "")


def parse_window(key: Optional[str]):
    """The decoder's ``window`` argument for a preset key (default ``auto``)."""
    key = (key or "auto").strip()
    if key not in WINDOW_PRESETS:
        raise UploadError(f"window {key!r}: choose one of {', '.join(WINDOW_PRESETS)}")
    return WINDOW_PRESETS[key][1]


def parse_frame(value: Optional[str]) -> Optional[int]:
    """An optional non-negative frame/slice index from a form field."""
    if value is None or str(value).strip() == "":
        return None
    try:
        frame = int(str(value).strip())
    except ValueError:
        raise UploadError(f"frame {value!r}: not a whole number") from None
    if frame < 0:
        raise UploadError(f"frame {frame}: must be 0 or more")
    return frame


def _imaging():
    """medlite's image decoders (``medlite.imaging`` after the issue-12 move, else the old home)."""
    try:
        from medlite.imaging import images
    except ImportError:
        from medlite.calibration import images
    return images


def _too_big(what: str, count: int, limit: int) -> UploadError:
    return UploadError(f"{what} has {count:,} pixels; this server accepts at most {limit:,} "
                       f"(medlite serve --max-pixels)", status=413)


def _check_pixels(path: Path, kind: str, limits: ServeLimits) -> None:
    """Refuse oversized images from their headers, before anything is decoded or allocated."""
    if kind == "raster":
        from PIL import Image

        try:
            with Image.open(path) as img:   # reads the header only
                w, h = img.size
        except Image.DecompressionBombError:   # Pillow's own guard, far above ours
            raise UploadError(f"the image is larger than Pillow's safety limit; this server accepts at most "
                              f"{limits.max_pixels:,} pixels", status=413) from None
        except Exception:   # unreadable: the decoder below gives the readable message
            return
        if w * h > limits.max_pixels:
            raise _too_big(f"the image ({w:,} x {h:,})", w * h, limits.max_pixels)
    elif kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        except Exception:
            return
        if rows * cols > limits.max_pixels:
            raise _too_big(f"each DICOM frame ({cols:,} x {rows:,})", rows * cols, limits.max_pixels)
    elif kind == "nifti":
        import nibabel as nib

        try:
            shape = nib.load(str(path)).shape
        except Exception:
            return
        voxels = int(np.prod(shape[:3], dtype=np.int64))
        if voxels > limits.max_voxels:
            raise UploadError(f"the NIfTI volume {tuple(shape)} has {voxels:,} voxels; this server accepts at most "
                              f"{limits.max_voxels:,}", status=413)


def _decode(path: Path, kind: str, frame: Optional[int], window):
    images = _imaging()
    if kind == "nifti":
        return images.decode_image(path, slice_index=frame, window=window)
    return images.decode_image(path, frame=frame, window=window)


def decode_upload(data: bytes, filename: Optional[str], *, frame: Optional[int] = None, window="auto",
                  limits: ServeLimits = ServeLimits(), tmp_root: Optional[Path] = None) -> DecodedUpload:
    """Decode uploaded bytes with medlite's loaders; the file lives in a private folder only meanwhile.

    ``frame`` is a DICOM frame / TIFF page or a NIfTI axial slice (None: the loader's default, the
    middle frame as ``medlite ask`` uses). Every failure is an :class:`UploadError` whose message
    names the upload by its base name, never the temporary path.
    """
    name = display_name(filename)
    if not data:
        raise UploadError(f"{name}: the file is empty")
    if len(data) > limits.max_upload_bytes:
        raise UploadError(f"{name}: {len(data):,} bytes; this server accepts at most "
                          f"{limits.max_upload_bytes:,} (medlite serve --max-upload-mb)", status=413)
    folder = Path(tempfile.mkdtemp(prefix="medlite-upload-", dir=tmp_root))   # mode 0700
    path = folder / ("upload" + _suffix(name))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return _decode_file(path, name, frame, window, limits)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _decode_file(path: Path, name: str, frame: Optional[int], window, limits: ServeLimits) -> DecodedUpload:
    try:
        kind = _imaging().sniff_kind(path)
        _check_pixels(path, kind, limits)
        d = _decode(path, kind, frame, window)
    except UploadError as e:
        raise UploadError(f"{name}: {e}", e.status) from None
    except DataError as e:
        raise UploadError(str(e).replace(str(path), name)) from None
    except MemoryError:
        raise UploadError(f"{name}: too large to decode in this server's memory", status=413) from None
    except Exception as e:   # decoder libraries raise many types on corrupt files; never crash the server
        raise UploadError(f"{name}: cannot decode this file as DICOM, NIfTI, PNG, JPEG or TIFF "
                          f"({type(e).__name__})") from None
    n = max(int(d.n_frames), 1)
    shown = frame if frame is not None else (n // 2 if kind != "raster" else 0)
    return DecodedUpload(d.image, kind, n, shown, d.modality, tuple(d.notes), tuple(d.warnings))


def model_view(image, spec: ImageSpec):
    """The model's input as an 8-bit image: :func:`preprocess` (pad, resize) with its normalisation undone.

    The vision graph receives exactly these pixels (up to float rounding, which ``rint`` removes).
    """
    from PIL import Image

    x = preprocess([image], spec)[0].astype(np.float64)                # [3, S, S]
    mean = np.asarray(spec.mean, np.float64)[:, None, None]
    std = np.asarray(spec.std, np.float64)[:, None, None]
    u8 = np.clip(np.rint((x * std + mean) / spec.rescale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), mode="RGB")


def png_data_url(image, max_side: Optional[int] = None) -> str:
    """A ``data:image/png;base64,...`` URL (downscaled to ``max_side`` for display only)."""
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
