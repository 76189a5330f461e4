"""The built-in medical image set: real clinical images that ship *inside* installed packages.

Nothing here downloads. ``pydicom.data.get_testdata_file`` fetches names listed in pydicom's
``urls.json`` over the network (and retries for ~21 s without one), so it is never called: files
are located on disk inside the package folders (found with ``importlib.util.find_spec``, which
does not import the package) and decoded by :mod:`medlite.imaging.images`.

Sources (see docs/data.md for the full table):

* ``pydicom`` wheel, ``pydicom/data/test_files/``;
* ``pydicom-data`` wheel (import name ``data_store``), ``data_store/data/``;
* ``scikit-image`` wheel, ``skimage/data/`` (retina.jpg, microaneurysms.png, ihc.png);
* ``nibabel`` wheel, ``nibabel/tests/data/example4d.nii.gz``.

Duplicates left out on purpose (same pixels under another name, which would break
image_id-disjoint held-out splits): examples_rgb_color / examples_jpeg2k (= US1_UNCR),
examples_palette (a crop of OBXXXX1A), examples_overlay (= MR-SIEMENS-DICOM-WithOverlays),
JPEG2000 / JPGExtended (= JPEG2000_UNC).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from medlite.imaging.types import MedImage
from medlite.errors import DataError


@dataclass(frozen=True)
class BuiltinEntry:
    """One source image of the built-in set (a file inside an installed package)."""

    image_id: str
    package: str            # import name of the package that ships the file
    relpath: str            # path inside the package folder
    modality: str           # medlite vocabulary (checked against the DICOM header)
    region: str
    is_color: bool
    description: str
    frames: tuple = (None,)  # DICOM frames to use (None: the file's default frame)
    window: object = "auto"  # passed to load_image (see images.decode_image)


_PD = "data/test_files/"
ENTRIES: tuple[BuiltinEntry, ...] = (
    BuiltinEntry("cr-chest", "data_store", "data/RG1_UNCR.dcm", "CR", "chest", False,
                 "PA chest radiograph, MONOCHROME1, 1955x1841; its stored window C15000/W30000 spans "
                 "the whole 15-bit range, so the 0.5-99.5% percentile window is used", window="percentile"),
    BuiltinEntry("cr-tibia", "data_store", "data/RG3_UNCR.dcm", "CR", "lower leg", False,
                 "radiograph of the distal tibia (non-ossifying fibroma), MONOCHROME1"),
    BuiltinEntry("ct-head", "data_store", "data/693_UNCR.dcm", "CT", "head", False,
                 "axial head CT, file window C40/W100 (brain)"),
    BuiltinEntry("ct-spine", "pydicom", _PD + "CT_small.dcm", "CT", "spine", False,
                 "axial CT through a vertebra, 128x128, no stored window (percentile)"),
    BuiltinEntry("ct-abdomen", "data_store", "data/explicit_VR-UN.dcm", "CT", "abdomen", False,
                 "contrast abdominal CT (pancreas), JPEG 2000 lossless; no stored window, so the "
                 "standard soft-tissue window C40/W400 HU is used", window=(40.0, 400.0)),
    BuiltinEntry("mr-abdomen", "data_store", "data/MR-SIEMENS-DICOM-WithOverlays.dcm", "MR", "abdomen", False,
                 "axial abdominal MR (liver lesion), overlays not drawn"),
    BuiltinEntry("mr-shoulder", "data_store", "data/MR2_UNCR.dcm", "MR", "shoulder", False,
                 "coronal shoulder MR, 1024x1024, rescale slope 3.77"),
    BuiltinEntry("mr-small", "pydicom", _PD + "MR_small.dcm", "MR", "unknown", False,
                 "64x64 spin-echo MR crop (20 mm field of view)"),
    BuiltinEntry("us-doppler", "data_store", "data/US1_UNCR.dcm", "US", "lymph node", True,
                 "colour Doppler ultrasound of a lymph node, RGB"),
    BuiltinEntry("us-obstetric", "data_store", "data/OBXXXX1A.dcm", "US", "pelvis", True,
                 "obstetric ultrasound, PALETTE COLOR; mostly empty field with scanner annotations"),
    BuiltinEntry("us-echo", "pydicom", _PD + "examples_ybr_color.dcm", "US", "heart", True,
                 "echocardiogram cine, 30 frames YBR_FULL_422 JPEG baseline; frames 0, 10, 20",
                 frames=(0, 10, 20)),
    BuiltinEntry("nm-bone", "data_store", "data/JPEG2000_UNC.dcm", "NM", "whole body", False,
                 "whole-body bone scintigraphy, 256x1024, percentile window"),
    BuiltinEntry("fundus-retina", "skimage", "data/retina.jpg", "fundus", "eye", True,
                 "colour fundus photograph (skimage.data.retina)"),
    BuiltinEntry("fundus-microaneurysms", "skimage", "data/microaneurysms.png", "fundus", "eye", False,
                 "greyscale fundus crop with microaneurysms (skimage.data.microaneurysms)"),
    BuiltinEntry("pathology-ihc", "skimage", "data/ihc.png", "pathology", "colon", True,
                 "immunohistochemistry (DAB + haematoxylin) of colonic glands "
                 "(skimage.data.immunohistochemistry)"),
    BuiltinEntry("mr-brain-epi", "nibabel", "tests/data/example4d.nii.gz", "MR", "head", False,
                 "brain EPI MR series 128x96x24x2: middle axial slice of volume 0"),
)


def package_dir(package: str) -> Optional[Path]:
    """The install folder of ``package`` without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def entry_path(entry: BuiltinEntry) -> Path:
    """Where ``entry``'s file is on disk; DataError naming the package when it is not there."""
    root = package_dir(entry.package)
    pip_name = {"data_store": "pydicom-data", "skimage": "scikit-image"}.get(entry.package, entry.package)
    if root is None:
        raise DataError(f"built-in image {entry.image_id}: package {pip_name!r} is not installed "
                        f"(pip install {pip_name})")
    path = root / entry.relpath
    if not path.is_file():
        raise DataError(f"built-in image {entry.image_id}: {path} is missing from the installed "
                        f"{pip_name} package (reinstall it: pip install --force-reinstall {pip_name})")
    return path


class BuiltinCache:
    """Decoded images of one :func:`builtin_images` call, so repeated ``load()`` decodes once.

    Callers get a copy, so drawing on a returned image cannot change what the next caller sees.
    """

    def __init__(self) -> None:
        self._images: dict = {}

    def load(self, entry: BuiltinEntry, frame: Optional[int]):
        key = (entry.image_id, frame)
        if key not in self._images:
            self._images[key] = _decode(entry, frame)
        return self._images[key].copy()


def _decode(entry: BuiltinEntry, frame: Optional[int]):
    from medlite.imaging.images import decode_image

    path = entry_path(entry)
    d = decode_image(path, frame=frame, window=entry.window)
    # The package files are fixed; a header that disagrees means the package changed under us.
    if d.modality is not None and d.modality != entry.modality:
        raise DataError(f"built-in image {entry.image_id}: {path} says modality {d.modality}, "
                        f"expected {entry.modality}")
    return d.image


def builtin_images(*, modalities: Optional[list[str]] = None, strict: bool = True, ctx=None) -> list[MedImage]:
    """The built-in medical image set as lazily loaded :class:`MedImage` objects.

    Every entry's file is checked to exist now (cheap); pixels are decoded on first ``load()`` and
    kept by a cache object private to this call. ``modalities`` filters by vocabulary label. With
    ``strict=False`` entries whose package is missing are skipped with a ``ctx.warn`` instead of
    raising :class:`DataError`.
    """
    cache = BuiltinCache()
    out: list[MedImage] = []
    for e in ENTRIES:
        if modalities is not None and e.modality not in modalities:
            continue
        try:
            entry_path(e)  # fail (or skip) now, not at the first load() deep inside a build
        except DataError as err:
            if strict:
                raise
            if ctx is not None:
                ctx.warn(f"{err}; skipping it")
            continue
        for fr in e.frames:
            out.append(MedImage(image_id=e.image_id, modality=e.modality, region=e.region,
                                source=f"{e.package}:{e.relpath}" + (f"#frame{fr}" if fr is not None else ""),
                                loader=functools.partial(cache.load, e, fr), frame=fr, is_color=e.is_color))
    if modalities is not None:
        missing = sorted(set(modalities) - {m.modality for m in out})
        if missing:
            raise DataError(f"the built-in image set has no {', '.join(missing)} images "
                            f"(it has: {', '.join(sorted({e.modality for e in ENTRIES}))})")
    return out
