"""The built-in medical image set: loads offline, windowing applied, MONOCHROME1 inverted, no dupes."""
from __future__ import annotations

import socket

import numpy as np
import pydicom
import pytest

from medlite.imaging import builtin
from medlite.imaging.builtin import ENTRIES, builtin_images, entry_path
from medlite.errors import DataError


@pytest.fixture(scope="module")
def loaded():
    """Every built-in image decoded once, with networking made impossible while loading."""
    mp = pytest.MonkeyPatch()

    def no_network(*a, **k):
        raise OSError("network disabled by test")

    def no_fetch(*a, **k):
        raise AssertionError("pydicom.data.get_testdata_file must never be called (it may download)")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    mp.setattr(pydicom.data, "get_testdata_file", no_fetch)
    try:
        images = builtin_images()
        arrays = [np.asarray(m.load()) for m in images]
    finally:
        mp.undo()
    return images, arrays


GREY_WINDOWED = {"cr-chest", "cr-tibia", "ct-head", "ct-spine", "ct-abdomen", "mr-abdomen", "mr-shoulder",
                 "mr-small", "nm-bone", "mr-brain-epi"}


def test_whole_set_loads_offline(loaded):
    images, arrays = loaded
    assert len(images) == 18 and len({m.image_id for m in images}) == 16
    assert {m.modality for m in images} == {"CT", "MR", "CR", "US", "NM", "fundus", "pathology"}
    for m, a in zip(images, arrays):
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, m.image_id
        assert min(a.shape[:2]) >= 64, m.image_id
        channel_diff = np.abs(a[..., 0].astype(int) - a[..., 2]).mean()
        assert (channel_diff > 0.5) == m.is_color, (m.image_id, channel_diff)  # grey = replicated


def test_windowing_was_applied(loaded):
    """Greyscale DICOM/NIfTI sources (10-16 bit) must be stretched over the 8-bit range.

    A naive conversion (stored value / dtype max, or no rescale) leaves these images dark and flat:
    e.g. RG1 (15-bit, max 26479) / 65535 would end at grey 103.
    """
    images, arrays = loaded
    seen = set()
    for m, a in zip(images, arrays):
        if m.image_id not in GREY_WINDOWED:
            continue
        seen.add(m.image_id)
        g = a[..., 0].astype(float)
        lo, hi = np.percentile(g, (0.5, 99.5))
        inside = np.mean((g > 0) & (g < 255))
        assert hi - lo >= 180, (m.image_id, lo, hi)          # uses most of the grey range
        assert g.std() >= 40, (m.image_id, g.std())          # real contrast, not a flat wash
        assert inside >= 0.2, (m.image_id, inside)           # not clipped black/white
    assert seen == GREY_WINDOWED


def test_ct_head_uses_its_file_window_exactly(loaded):
    images, arrays = loaded
    out = arrays[[m.image_id for m in images].index("ct-head")][..., 0]
    ds = pydicom.dcmread(entry_path(next(e for e in ENTRIES if e.image_id == "ct-head")))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 100.0)
    # LINEAR window C40/W100: black at HU <= -10, white above 89, mid-grey at the centre
    assert np.all(out[hu <= -10] == 0) and np.all(out[hu > 89.5] == 255)
    assert (hu == 40).sum() > 100 and np.all(np.abs(out[hu == 40].astype(int) - 128) <= 1)


def test_monochrome1_chest_is_inverted(loaded):
    """RG1 (MONOCHROME1): low stored values are dense tissue. After loading, the mediastinum/spine
    column must be brighter than the lungs, the reverse of the stored values."""
    images, arrays = loaded
    out = arrays[[m.image_id for m in images].index("cr-chest")][..., 0].astype(float)
    ds = pydicom.dcmread(entry_path(next(e for e in ENTRIES if e.image_id == "cr-chest")))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(float)
    assert raw.shape == out.shape

    def band(a, x0, x1):
        h, w = a.shape
        return a[int(0.3 * h):int(0.6 * h), int(x0 * w):int(x1 * w)].mean()

    for a, sign in ((out, 1), (raw, -1)):
        mediastinum = band(a, 0.45, 0.55)
        lungs = (band(a, 0.2, 0.3) + band(a, 0.7, 0.8)) / 2
        assert sign * (mediastinum - lungs) > 0.1 * (a.max() - a.min()), (sign, mediastinum, lungs)
    sub = (slice(None, None, 16), slice(None, None, 16))
    assert np.corrcoef(raw[sub].ravel(), out[sub].ravel())[0, 1] < -0.95


def test_monochrome1_tibia_background_is_white(loaded):
    images, arrays = loaded
    out = arrays[[m.image_id for m in images].index("cr-tibia")][..., 0]
    raw = pydicom.dcmread(entry_path(next(e for e in ENTRIES if e.image_id == "cr-tibia"))).pixel_array
    assert (raw == 0).mean() > 0.3          # unexposed (collimated) area stored as 0 ...
    assert np.all(out[raw == 0] == 255)     # ... is white once MONOCHROME1 is honoured


def test_dicom_headers_match_entry_modality():
    codes = {"CR": {"CR", "DX"}, "CT": {"CT"}, "MR": {"MR"}, "US": {"US"}, "NM": {"NM"}}
    n = 0
    for e in ENTRIES:
        if e.relpath.endswith(".dcm"):
            ds = pydicom.dcmread(entry_path(e), stop_before_pixels=True)
            assert ds.Modality in codes[e.modality], (e.image_id, ds.Modality)
            n += 1
    assert n == 12


def test_echo_frames_share_image_id_but_differ(loaded):
    images, arrays = loaded
    idx = [i for i, m in enumerate(images) if m.image_id == "us-echo"]
    assert [images[i].frame for i in idx] == [0, 10, 20]
    assert not np.array_equal(arrays[idx[0]], arrays[idx[1]])


def test_no_duplicate_pixels_across_image_ids(loaded):
    """Two ids showing the same picture would leak across an image_id-disjoint held-out split."""
    from PIL import Image

    images, arrays = loaded
    thumbs, ids = [], []
    for m, a in zip(images, arrays):
        if m.image_id in ids:
            continue
        ids.append(m.image_id)
        t = np.asarray(Image.fromarray(a).convert("L").resize((32, 32), Image.BILINEAR), float).ravel()
        thumbs.append((t - t.mean()) / (t.std() + 1e-9))
    c = np.corrcoef(np.stack(thumbs))
    np.fill_diagonal(c, 0)
    assert c.max() < 0.95, [(ids[i], ids[j]) for i, j in zip(*np.where(c >= 0.95))]


def test_cache_is_per_call_and_returns_copies(monkeypatch):
    calls = []
    real = builtin._decode

    def counting(entry, frame):
        calls.append(entry.image_id)
        return real(entry, frame)

    monkeypatch.setattr(builtin, "_decode", counting)
    spine = [m for m in builtin_images(modalities=["CT"]) if m.image_id == "ct-spine"][0]
    a = spine.load()
    a.paste((255, 0, 0), (0, 0, 10, 10))          # caller scribbles on its copy
    b = spine.load()
    assert calls == ["ct-spine"] and b.getpixel((0, 0)) != (255, 0, 0)
    [m for m in builtin_images(modalities=["CT"]) if m.image_id == "ct-spine"][0].load()
    assert calls == ["ct-spine", "ct-spine"]      # a new call has its own cache


def test_filters_and_missing_packages(monkeypatch, tmp_path):
    assert {m.modality for m in builtin_images(modalities=["fundus", "NM"])} == {"fundus", "NM"}
    with pytest.raises(DataError, match="no PET images"):
        builtin_images(modalities=["PET"])
    real = builtin.package_dir
    monkeypatch.setattr(builtin, "package_dir", lambda p: None if p == "skimage" else real(p))
    with pytest.raises(DataError, match="package 'scikit-image' is not installed"):
        builtin_images()
    from medlite.context import RunContext

    ctx = RunContext(cache_dir=tmp_path, quiet=True)
    images = builtin_images(strict=False, ctx=ctx)
    assert "fundus" not in {m.modality for m in images} and len(ctx.warnings) == 3
