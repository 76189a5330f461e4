"""DICOM decoding for :mod:`medlite.imaging.images` (pydicom; torch-free).

Greyscale: stored values → Modality LUT (LUT sequence, or rescale slope/intercept, also from
enhanced multi-frame functional groups) → VOI (VOI LUT sequence, else the first window centre/width
with its VOI LUT function; an unusable file window is replaced by a percentile window and reported)
→ MONOCHROME1 / Presentation LUT INVERSE inversion. Colour: RGB as stored, YBR converted to RGB by
pydicom/the JPEG 2000 codec, PALETTE COLOR through its colour LUT.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from medlite.imaging.pixels import (DecodedImage, fixed_or_percentile, linear_window,
                                        normalize_modality, percentile_window, to_rgb8,
                                        window_is_useless)
from medlite.errors import DataError

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
JPEG_EXTRA_HINT = "install the JPEG plugins: pip install 'medlite[jpeg]'"

# SOP classes whose pixels are not a picture of anatomy: a model asked about them would answer about
# labels or dose values (PS3.4 B.5 storage SOP classes).
NOT_ANATOMY = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation (SEG): its pixels are labels of regions, not an image",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose grid: its pixels are radiation dose, not an image",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set: contours, not an image",
    "1.2.840.10008.5.1.4.1.1.30": "a parametric map: its pixels are computed values, not an image",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF document, not an image",
}


def _first(v) -> float:
    """First value of a possibly multi-valued DICOM element, as float."""
    try:
        return float(v)
    except TypeError:  # MultiValue: several windows / LUTs, the first is the default view
        try:
            return float(v[0])
        except (TypeError, ValueError, IndexError):
            return float("nan")
    except ValueError:
        return float("nan")


def _group_attr(ds, frame: int, seq: str, attr: str):
    """``attr`` from an enhanced multi-frame functional group (per-frame first, then shared)."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and idx < len(items) and items[idx].get(seq):
            value = items[idx].get(seq)[0].get(attr)
            if value is not None:
                return value
    return None


def _attr(ds, frame: int, seq: str, attr: str):
    value = ds.get(attr)
    return value if value is not None else _group_attr(ds, frame, seq, attr)


def _check_decoder(ds, path: Path) -> None:
    """Raise a DataError naming the transfer syntax when no installed plugin can decode it."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None or not uid.is_encapsulated:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DataError(f"{path}: no pixel decoder exists for transfer syntax {uid.name} ({uid})") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise DataError(f"{path}: pixel data uses transfer syntax {uid.name} ({uid}) and no "
                        f"installed plugin decodes it ({missing}); {JPEG_EXTRA_HINT}")


def _preferred_plugin(ds) -> Optional[str]:
    """``"pillow"`` when Pillow can decode this transfer syntax, else None (pydicom's own order).

    Lossy JPEG decoders do not agree to the last grey level (libjpeg-turbo in Pillow vs libjpeg in
    ``pylibjpeg-libjpeg``; measured on the built-in echo frames). Pillow is always installed, so
    preferring it makes the decoded pixels — and everything computed from them: calibration sets,
    Micro Med-VQA, the demo model's weights — the same whether or not the ``jpeg`` extra is present.
    """
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None or not uid.is_encapsulated:
        return None
    try:
        return "pillow" if "pillow" in get_decoder(uid).available_plugins else None
    except NotImplementedError:
        return None


def _dicom_frame(ds, path: Path, frame: int) -> np.ndarray:
    _check_decoder(ds, path)
    plugin = _preferred_plugin(ds)
    # decode only the frame we need
    ds.pixel_array_options(index=frame, **({"decoding_plugin": plugin} if plugin else {}))
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:  # plugin present but unable (e.g. 12-bit JPEG through Pillow)
        uid = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = getattr(uid, "name", uid)
        msg = " ".join(str(e).split())
        if "less than expected" in msg:   # pydicom's words for pixel data cut short
            raise DataError(f"{path}: the file is truncated: its pixel data is shorter than the header says "
                            f"({msg.split(' - ')[0]})") from None
        compressed = bool(getattr(uid, "is_encapsulated", False))
        raise DataError(f"{path}: cannot decode pixel data (transfer syntax {name} ({uid})): {msg}"
                        + (f"; {JPEG_EXTRA_HINT}" if compressed else "")) from None


def _dicom_grey(arr: np.ndarray, ds, frame: int, window, notes: list, warns: list) -> np.ndarray:
    """Modality LUT → VOI → inversion for one greyscale frame; returns [0, 1] floats."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    if ds.get("ModalityLUTSequence"):
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    else:
        slope = _attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = _attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        values = arr.astype(np.float64) * (float(slope) if slope is not None else 1.0) \
            + (float(icpt) if icpt is not None else 0.0)

    out = None
    if isinstance(window, tuple):
        out, desc = fixed_or_percentile(values, window)
        notes.append(desc)
    elif window != "percentile":
        center = _attr(ds, frame, "FrameVOILUTSequence", "WindowCenter")
        width = _attr(ds, frame, "FrameVOILUTSequence", "WindowWidth")
        if ds.get("VOILUTSequence"):
            item = ds.VOILUTSequence[0]
            depth = int(item.LUTDescriptor[2])
            # pydicom's VOI LUT indexes with integer input values: round the modality values.
            out = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds), np.float64) / (2 ** depth - 1)
            desc = f"VOI LUT sequence ({depth}-bit)"
        elif center is not None and width is not None:
            c, w = _first(center), _first(width)
            func = str(_attr(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
            if np.isfinite(c) and np.isfinite(w) and w >= (1.0 if func == "LINEAR" else 1e-9):
                out = linear_window(values, c, w, func)
                desc = f"file window C{c:g}/W{w:g} ({func})"
            else:
                warns.append(f"invalid window C{center}/W{width}: using a percentile window instead")
        if out is not None:
            why = window_is_useless(out) if window == "auto" else None
            if why:
                warns.append(f"the {desc} is unusable ({why}): using a 0.5-99.5% percentile window")
                out = None
            else:
                notes.append(desc)
        elif window == "file":
            raise DataError("no usable VOI LUT or window centre/width in the file (window='file')")
    if out is None:
        out, desc = percentile_window(values)
        notes.append(desc)

    # DX/MG require Presentation LUT Shape INVERSE *with* MONOCHROME1 (PS3.3 C.8.11.6): it names the
    # same inversion, so the two are OR-ed, never applied twice.
    mono1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    if mono1 or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        notes.append("inverted (MONOCHROME1 / INVERSE presentation)")
        out = 1.0 - out
    return out


def decode_dicom(path: Path, frame: Optional[int], window="auto") -> DecodedImage:
    """Decode one frame of a DICOM file to 8-bit RGB (``frame=None``: the middle frame).

    ``window`` is "auto", "file", "percentile" or a (centre, width) tuple; see the module docstring.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    warns: list = []
    # pydicom reports file quirks as UserWarnings: collect them for ctx.warn instead of stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: not a readable DICOM file: {e}") from None
        _check_is_dicom(ds, path)
        _check_content(ds, path, warns)
        decoded = _decode_frames(ds, path, frame, window, warns)
    extra = tuple(f"pydicom: {' '.join(str(w.message).split())}" for w in caught)
    return dataclasses.replace(decoded, warnings=decoded.warnings + extra) if extra else decoded


# Element groups every DICOM image carries some of (file meta, identification, patient, acquisition,
# image pixel module): a ".dcm" holding none of them, and no "DICM" marker, is not DICOM at all.
_DICOM_GROUPS = frozenset({0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028, 0x7FE0})


def _check_is_dicom(ds, path: Path) -> None:
    """An empty file, or a file that only has a DICOM suffix (a renamed text file), says so instead of
    "no pixel data": ``dcmread(force=True)`` reads any bytes as a (junk) data set."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes): not a DICOM file")
    has_marker = getattr(ds, "preamble", None) is not None or len(getattr(ds, "file_meta", None) or ()) > 0
    if not has_marker and not any(tag.group in _DICOM_GROUPS for tag in ds.keys()):
        raise DataError(f"{path}: not a DICOM file (no DICM marker and no DICOM elements; only its name "
                        f"ends in {path.suffix})")


def _check_content(ds, path: Path, warns: list) -> None:
    """Refuse what is not a picture of anatomy; a truncated file says so; warn on an ignored palette."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop in NOT_ANATOMY:
        raise DataError(f"{path}: this DICOM file is {NOT_ANATOMY[sop]} (SOP class "
                        f"{getattr(ds.get('SOPClassUID'), 'name', sop)}); give the image it was made from")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop_name = str(getattr(ds.get("SOPClassUID"), "name", ""))
        if "Rows" in ds and "Columns" in ds:
            raise DataError(f"{path}: the file is truncated: the header describes a {ds.Rows}×{ds.Columns} "
                            f"image but the file ends before its pixel data")
        if "Image Storage" in sop_name:
            raise DataError(f"{path}: the file is truncated: a {sop_name} file carries pixel data, but this "
                            f"one ends before it")
        raise DataError(f"{path}: DICOM file has no pixel data (SOP class "
                        f"{getattr(ds.get('SOPClassUID'), 'name', ds.get('SOPClassUID'))})")
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    if pi != "PALETTE COLOR" and "RedPaletteColorLookupTableDescriptor" in ds:
        warns.append(f"{pi or 'grey'} image with a supplemental palette colour LUT (e.g. a perfusion or "
                     f"functional map): the palette is ignored and the image is shown in grey")


def _decode_frames(ds, path: Path, frame: Optional[int], window, warns: list) -> DecodedImage:
    n_frames = int(ds.get("NumberOfFrames") or 1)
    notes: list = []
    if frame is None:
        frame = n_frames // 2
        if n_frames > 1:
            notes.append(f"frame {frame} of {n_frames} (middle)")
    elif not 0 <= frame < n_frames:
        raise DataError(f"{path}: frame {frame} out of range: frames count from 0 and the file has {n_frames}, "
                        f"so --frame takes 0 to {n_frames - 1}")
    arr = _dicom_frame(ds, path, frame)
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = np.asarray(apply_color_lut(arr, ds))[..., :3].astype(np.float64)
        # Some writers declare 16-bit palettes but store 8-bit entries: scale by what is there.
        unit = rgb / (255.0 if rgb.max() <= 255 else 65535.0)
        notes.append("palette colour LUT")
    elif samples == 3:
        # pydicom already converted YBR_FULL/_422 to RGB; JPEG 2000 codecs undo YBR_ICT/RCT.
        bits = int(ds.get("BitsStored") or 8)
        unit = arr.astype(np.float64) / (2 ** bits - 1)
        if pi.startswith("YBR"):
            notes.append(f"{pi} converted to RGB")
    elif samples == 1:
        try:
            unit = _dicom_grey(arr, ds, frame, window, notes, warns)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    else:
        raise DataError(f"{path}: unsupported SamplesPerPixel={samples} ({pi})")
    return DecodedImage(to_rgb8(unit), "dicom", n_frames, normalize_modality(ds.get("Modality")),
                        tuple(notes), tuple(warns))


def dicom_header(path: Path) -> tuple[str, int, bool]:
    """(modality, frames, is_color) from the header only (no pixel decoding)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # header-only read: any failure means "not readable DICOM"
        raise DataError(f"{path}: not a readable DICOM file: {e}") from None
    color = int(ds.get("SamplesPerPixel") or 1) == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    return normalize_modality(ds.get("Modality")), int(ds.get("NumberOfFrames") or 1), bool(color)
