"""Image loading: DICOM display pipeline, NIfTI slicing, raster files, folders/globs, errors.

Synthetic DICOM/NIfTI files are written with pydicom/nibabel into tmp_path so every expected pixel
value can be computed by hand; real files shipped in the pydicom package check the codecs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGExtended12Bit, generate_uid

from medlite.imaging.images import (JPEG_EXTRA_HINT, decode_image, load_image, load_images,
                                        normalize_modality)
from medlite.context import RunContext
from medlite.errors import DataError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def make_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", modality: str = "CT",
               frames: int | None = None, **attrs) -> Path:
    """Write a small native (uncompressed) DICOM file; ``attrs`` become top-level elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    arr = np.ascontiguousarray(pixels)
    color = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    shape = arr.shape[1:] if frames else arr.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    if frames:
        ds.NumberOfFrames = frames
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def grey(img) -> np.ndarray:
    a = np.asarray(img)
    assert img.mode == "RGB" and a.dtype == np.uint8
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    return a[..., 0].astype(int)


# -- DICOM greyscale ---------------------------------------------------------------------------
def ct_ramp() -> np.ndarray:
    # stored values 0..1023 → HU -1024..-1 with slope 1, intercept -1024; extra rows for spread
    return np.arange(32 * 32, dtype=np.int16).reshape(32, 32)


def test_rescale_and_window_match_hand_computed_values(tmp_path):
    # slope 2, intercept -1000: stored s → 2s-1000. Window C0/W401 (LINEAR): lower edge
    # c-0.5-(w-1)/2 = -200.5, upper -0.5+200 = 199.5.
    p = make_dicom(tmp_path / "ct.dcm", ct_ramp(), RescaleSlope=2, RescaleIntercept=-1000,
                   WindowCenter=0, WindowWidth=401)
    out = grey(load_image(p))
    hu = 2 * ct_ramp().astype(float) - 1000
    expected = np.rint(np.clip((hu + 0.5) / 400 + 0.5, 0, 1) * 255)
    assert np.array_equal(out, expected)
    assert out[hu <= -201].max() == 0 and out[hu >= 200].min() == 255
    assert out[hu == 0][0] == 128  # centre maps to mid-grey


def test_matches_pydicom_reference_pipeline_on_real_ct():
    """Our modality LUT + window equals pydicom's own apply_modality_lut + apply_windowing."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    path = PYDICOM_FILES / "MR_small.dcm"  # 16-bit signed, window C600/W1600
    ds = pydicom.dcmread(path)
    ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = -(2 ** 15), 2 ** 15 - 1  # pydicom maps to the signed 16-bit output range
    ref8 = np.rint((ref - lo) / (hi - lo) * 255)
    assert np.abs(grey(load_image(path)) - ref8).max() <= 1


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    kw = dict(WindowCenter=512, WindowWidth=1024)
    m2 = grey(load_image(make_dicom(tmp_path / "m2.dcm", ct_ramp(), **kw)))
    d = decode_image(make_dicom(tmp_path / "m1.dcm", ct_ramp(), photometric="MONOCHROME1", **kw))
    assert np.array_equal(grey(d.image), 255 - m2)
    assert any("inverted" in n for n in d.notes)
    assert grey(d.image)[0, 0] == 255  # stored 0 (most attenuation in MONOCHROME1) is white


def test_presentation_lut_inverse_inverts_once(tmp_path):
    kw = dict(WindowCenter=512, WindowWidth=1024)
    m2 = grey(load_image(make_dicom(tmp_path / "m2.dcm", ct_ramp(), **kw)))
    dx = make_dicom(tmp_path / "dx.dcm", ct_ramp(), photometric="MONOCHROME1", modality="DX",
                    PresentationLUTShape="INVERSE", **kw)  # as DX requires for MONOCHROME1
    assert np.array_equal(grey(load_image(dx)), 255 - m2)
    inv2 = make_dicom(tmp_path / "inv2.dcm", ct_ramp(), PresentationLUTShape="INVERSE", **kw)
    assert np.array_equal(grey(load_image(inv2)), 255 - m2)


def test_voi_lut_sequence(tmp_path):
    from pydicom.sequence import Sequence

    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])                      # LUT Descriptor
    item.add_new(0x00283006, "US", [255 - i for i in range(256)])    # LUT Data: reverses 0..255
    pix = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    p = make_dicom(tmp_path / "voi.dcm", pix, VOILUTSequence=Sequence([item]), WindowCenter=0, WindowWidth=2)
    d = decode_image(p)
    assert np.array_equal(grey(d.image), 255 - pix) and d.notes[0] == "VOI LUT sequence (8-bit)"


def test_missing_window_uses_percentile_window(tmp_path):
    pix = np.zeros((40, 50), np.uint16)
    pix[:, 25:] = 1000
    pix[0, 0] = 60000  # one hot pixel must not define the white point
    d = decode_image(make_dicom(tmp_path / "mr.dcm", pix, modality="MR"))
    out = grey(d.image)
    assert out[5, 5] == 0 and out[5, 30] == 255 and out[0, 0] == 255
    assert any(n.startswith("percentile window") for n in d.notes) and d.warnings == ()


def test_useless_file_window_falls_back_and_warns(tmp_path):
    # Like a C15000/W30000 window over data spanning 0..1000: everything lands in 3% of the greys.
    pix = (np.arange(100 * 100) % 1000).astype(np.uint16).reshape(100, 100)
    p = make_dicom(tmp_path / "cr.dcm", pix, modality="CR", WindowCenter=15000, WindowWidth=30000)
    d = decode_image(p)
    assert len(d.warnings) == 1 and "unusable" in d.warnings[0] and "C15000/W30000" in d.warnings[0]
    out = grey(d.image)
    assert out.min() == 0 and out.max() == 255  # percentile stretch uses the whole range
    strict = grey(decode_image(p, window="file").image)
    assert strict.max() - strict.min() <= 10  # what the file window alone would have given

    from medlite.context import RunContext

    ctx = RunContext(cache_dir=tmp_path, quiet=True)
    load_image(p, ctx=ctx)
    assert len(ctx.warnings) == 1 and str(p) in ctx.warnings[0]


def test_window_clipping_everything_is_useless(tmp_path):
    pix = np.full((20, 20), 3000, np.int16)
    pix[:10] = 2000
    d = decode_image(make_dicom(tmp_path / "ct.dcm", pix, WindowCenter=40, WindowWidth=80))
    assert d.warnings and "inside it" in d.warnings[0]
    assert set(np.unique(grey(d.image))) == {0, 255}


def test_explicit_window_and_bad_window_argument(tmp_path):
    p = make_dicom(tmp_path / "ct.dcm", ct_ramp(), RescaleSlope=1, RescaleIntercept=-1024)
    out = grey(load_image(p, window=(-600, 201)))  # HU = stored - 1024
    hu = ct_ramp() - 1024.0
    assert np.array_equal(out, np.rint(np.clip((hu + 600.5) / 200 + 0.5, 0, 1) * 255))
    with pytest.raises(DataError, match="window"):
        load_image(p, window="bone")
    with pytest.raises(DataError, match="no usable VOI LUT or window"):
        load_image(p, window="file")


# -- DICOM colour and frames ----------------------------------------------------------------
def test_palette_colour(tmp_path):
    pix = np.array([[0, 1], [2, 3]], np.uint8)
    lut = {"Red": [0, 65535, 0, 0], "Green": [0, 0, 65535, 0], "Blue": [0, 0, 0, 65535]}
    attrs = {}
    for c, vals in lut.items():
        attrs[f"{c}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        attrs[f"{c}PaletteColorLookupTableData"] = np.asarray(vals, np.uint16).tobytes()
    p = make_dicom(tmp_path / "pal.dcm", pix, photometric="PALETTE COLOR", modality="US", **attrs)
    a = np.asarray(load_image(p))
    assert a[0, 0].tolist() == [0, 0, 0] and a[0, 1].tolist() == [255, 0, 0]
    assert a[1, 0].tolist() == [0, 255, 0] and a[1, 1].tolist() == [0, 0, 255]


def test_ybr_full_is_converted_to_rgb(tmp_path):
    # Pure red in YCbCr (ITU-R BT.601 full range): Y=76, Cb=85, Cr=255.
    pix = np.zeros((4, 4, 3), np.uint8)
    pix[...] = (76, 85, 255)
    p = make_dicom(tmp_path / "ybr.dcm", pix, photometric="YBR_FULL", modality="US")
    r, g, b = np.asarray(load_image(p))[0, 0].astype(int)
    assert r >= 250 and g <= 5 and b <= 5


def test_rgb_passthrough(tmp_path):
    pix = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    p = make_dicom(tmp_path / "rgb.dcm", pix, photometric="RGB", modality="US")
    assert np.array_equal(np.asarray(load_image(p)), pix)


def test_multiframe_frames(tmp_path):
    pix = np.stack([np.full((8, 8), v, np.uint16) for v in (0, 100, 200)])
    pix[:, :, 6:] = 300  # a spread inside each frame, so the file window counts as usable
    p = make_dicom(tmp_path / "cine.dcm", pix, frames=3, modality="US", WindowCenter=150, WindowWidth=301)
    vals = [grey(load_image(p, frame=f))[4, 4] for f in range(3)]
    assert vals == [0, 85, 170]  # round(255 * ((v - 149.5) / 300 + 0.5))
    d = decode_image(p)
    assert d.n_frames == 3 and grey(d.image)[4, 4] == 85 and "frame 1 of 3 (middle)" in d.notes
    with pytest.raises(DataError, match="frame 3 out of range"):
        load_image(p, frame=3)
    imgs = load_images(p, expand_frames=True)
    assert [m.frame for m in imgs] == [0, 1, 2] and len({m.image_id for m in imgs}) == 1
    assert [grey(m.load())[4, 4] for m in imgs] == [0, 85, 170]
    assert [m.frame for m in load_images(p, expand_frames=True, max_frames=2)] == [0, 2]


def test_real_compressed_files_decode():
    ybr = decode_image(PYDICOM_FILES / "examples_ybr_color.dcm", frame=0)  # JPEG baseline, 30 frames
    assert ybr.n_frames == 30 and ybr.modality == "US" and ybr.image.size == (320, 240)
    j2k = decode_image(PYDICOM_FILES / "examples_jpeg2k.dcm")  # JPEG 2000 lossless, YBR_RCT
    rgb = decode_image(PYDICOM_FILES / "examples_rgb_color.dcm")  # same ultrasound, native RGB, half size
    small = np.asarray(j2k.image.resize(rgb.image.size, Image.BILINEAR), float)
    assert np.corrcoef(small.ravel(), np.asarray(rgb.image, float).ravel())[0, 1] > 0.99


def test_missing_jpeg_plugin_names_file_syntax_and_extra(monkeypatch):
    """Simulate an install without pylibjpeg: pydicom's decoder for JPEG Extended has no plugin."""
    from pydicom.pixels import get_decoder

    dec = get_decoder(JPEGExtended12Bit)
    monkeypatch.setattr(dec, "_available", {})
    monkeypatch.setattr(dec, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    path = PYDICOM_FILES / "JPGExtended.dcm"
    with pytest.raises(DataError) as e:
        load_image(path)
    msg = str(e.value)
    assert str(path) in msg and "JPEG Extended (Process 2 and 4)" in msg
    assert "1.2.840.10008.1.2.4.51" in msg and "medlite[jpeg]" in msg and JPEG_EXTRA_HINT in msg


def test_decoder_failure_is_a_data_error(monkeypatch):
    from pydicom.pixels import get_decoder

    def broken(*a, **k):
        raise RuntimeError("codec exploded")

    dec = get_decoder(JPEGExtended12Bit)
    monkeypatch.setattr(dec, "_available", {"pillow": broken})
    with pytest.raises(DataError, match="JPGExtended.dcm: cannot decode pixel data.*codec exploded"):
        load_image(PYDICOM_FILES / "JPGExtended.dcm")


# -- NIfTI ------------------------------------------------------------------------------------
def test_nifti_slices_orientation_and_volumes(tmp_path):
    import nibabel as nib

    vol = np.zeros((6, 8, 5, 2), np.float32)
    for k in range(5):
        vol[:, :, k, 0] = k + 1          # axial slice k is constant k+1 ...
    vol[1, 7, :, 0] = 100                # ... plus a marker at left-ish x=1, most anterior y=7
    vol[:, :, :, 1] = 50 - vol[:, :, :, 0]
    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), p)  # identity affine: already RAS
    d = decode_image(p)
    a = grey(d.image)
    assert a.shape == (8, 6)                      # rows = y (A→P top-down), cols = x
    assert a[0, 1] == 255 and a.sum() == 255      # marker at the top (anterior up), rest uniform black
    assert "slice 2 of 5 along axis 2, volume 0" in d.notes[0]
    assert grey(load_image(p, axis=0)).shape == (5, 8)  # sagittal: rows = z, cols = y
    v1 = grey(load_image(p, volume=1))
    assert v1[0, 1] == 0 and v1[1, 1] == 255      # volume 1 is the negative
    with pytest.raises(DataError, match="volume 2 out of range"):
        load_image(p, volume=2)
    with pytest.raises(DataError, match="slice 9 out of range"):
        load_image(p, slice_index=9)


def test_nifti_flipped_affine_is_reoriented(tmp_path):
    import nibabel as nib

    vol = np.zeros((6, 8, 3), np.float32)
    vol[1, 0, :] = 100  # y index 0 is *anterior* when the y axis is flipped in the affine
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, -1.0, 1.0, 1.0])), tmp_path / "f.nii")
    a = grey(load_image(tmp_path / "f.nii"))
    assert a[0, 1] == 255  # still drawn at the top


# -- raster files, folders, globs, errors -------------------------------------------------------
def test_png_modes(tmp_path):
    g = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    assert np.array_equal(grey(load_image(tmp_path / "g.png")), g)
    g16 = (np.arange(48).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    d = decode_image(tmp_path / "g16.png")
    out = grey(d.image)
    assert out[0, 0] == 0 and out[-1, -1] == 255 and "percentile window" in d.notes[0]
    pages = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    assert grey(load_image(tmp_path / "m.tif", frame=2))[0, 0] == 30
    assert decode_image(tmp_path / "m.tif").n_frames == 3


def test_folder_and_glob(tmp_path):
    (tmp_path / "scans" / "sub").mkdir(parents=True)
    make_dicom(tmp_path / "scans" / "a.dcm", ct_ramp())
    make_dicom(tmp_path / "scans" / "sub" / "b.dcm", ct_ramp(), modality="MR")
    Image.new("RGB", (5, 5), (9, 9, 9)).save(tmp_path / "scans" / "c.png")
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    imgs = load_images(tmp_path / "scans")
    assert [(m.image_id, m.modality, m.is_color) for m in imgs] == [
        ("a.dcm", "CT", False), ("c.png", "unknown", True), ("sub/b.dcm", "MR", False)]
    assert imgs[1].load().size == (5, 5)
    globbed = load_images(str(tmp_path / "scans" / "**" / "*.dcm"))
    assert sorted(m.image_id for m in globbed) == ["a.dcm", "sub/b.dcm"]
    assert [m.modality for m in load_images(tmp_path / "scans" / "c.png", modality="fundus")] == ["fundus"]
    with pytest.raises(DataError, match=r"nothing/\*.dcm: no files match this glob"):
        load_images(str(tmp_path / "nothing" / "*.dcm"))
    with pytest.raises(DataError, match="nothing: no such file or folder"):
        load_images(tmp_path / "nothing")
    with pytest.raises(DataError, match="notes.txt: not a readable image"):
        load_images(tmp_path / "scans" / "notes.txt")


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.dcm: no such file"):
        load_image(tmp_path / "missing.dcm")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        load_image(bad)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match="fake.dcm"):
        load_image(fake)
    with pytest.raises(DataError, match="is a folder"):
        load_image(tmp_path)
    sr = PYDICOM_FILES / "test-SR.dcm"  # structured report: no pixels
    with pytest.raises(DataError, match="test-SR.dcm: DICOM file has no pixel data"):
        load_image(sr)


def test_modality_vocabulary():
    assert [normalize_modality(c) for c in ("CT", "MR", "DX", "X-Ray", "MRI", "OP", "SM", "PT", "XYZ", None)] == [
        "CT", "MR", "CR", "CR", "MR", "fundus", "pathology", "NM", "unknown", "unknown"]


def test_data_modules_stay_torch_free():
    """The on-device runtime imports these with numpy + Pillow + pydicom only."""
    import subprocess
    import sys

    code = ("import sys, medlite.imaging as c, medlite.evaluation as e\n"
            "import medlite.imaging.images, medlite.imaging.builtin, medlite.imaging.dicom, medlite.evaluation.vqa\n"
            "import medlite.evaluation.scoring, medlite.calibration.calibset\n"
            "assert callable(c.load_image) and callable(e.score)\n"
            "heavy = [m for m in ('torch', 'transformers', 'skimage', 'nibabel') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- decoder choice ------------------------------------------------------------------------------
def test_lossy_jpeg_decodes_with_pillow_whether_or_not_pylibjpeg_is_installed():
    """The built-in echo frames are JPEG baseline; decoders disagree by a few grey levels, so the
    pixels (and the demo model trained on them) would depend on the optional extra. Pillow wins."""
    from medlite.imaging.dicom import _dicom_frame

    path = PYDICOM_FILES / "examples_ybr_color.dcm"
    ds = pydicom.dcmread(path)
    ours = _dicom_frame(ds, path, 0)
    ref = pydicom.dcmread(path)
    ref.pixel_array_options(index=0, decoding_plugin="pillow")
    np.testing.assert_array_equal(ours, ref.pixel_array)
    try:
        import pylibjpeg  # noqa: F401  (the `jpeg` extra)
    except ImportError:
        return
    other = pydicom.dcmread(path)
    other.pixel_array_options(index=0, decoding_plugin="pylibjpeg")
    # the choice matters: with the extra installed, pydicom alone would not give Pillow's pixels
    assert np.abs(other.pixel_array.astype(int) - ours.astype(int)).max() > 0


# -- files that are not pictures of anatomy, broken files, choices made for the user -----------------
def _ct_small():
    pydicom_data = pytest.importorskip("pydicom.data")
    return Path(pydicom_data.get_testdata_file("CT_small.dcm"))


@pytest.mark.parametrize("cut", [0.5, 0.04])
def test_truncated_dicom_says_truncated(tmp_path, cut):
    src = _ct_small().read_bytes()
    p = tmp_path / "cut.dcm"
    p.write_bytes(src[:int(len(src) * cut)])
    with pytest.raises(DataError) as e:
        decode_image(p)
    msg = str(e.value)
    assert "truncated" in msg and "no pixel data" not in msg
    assert "medlite[jpeg]" not in msg        # an uncompressed file needs no JPEG plugin


@pytest.mark.parametrize("uid, word", [("1.2.840.10008.5.1.4.1.1.66.4", "segmentation"),
                                       ("1.2.840.10008.5.1.4.1.1.481.2", "RT dose")])
def test_dicom_that_is_not_anatomy_is_refused_by_sop_class(tmp_path, uid, word):
    import pydicom

    ds = pydicom.dcmread(_ct_small())
    ds.SOPClassUID = uid
    ds.file_meta.MediaStorageSOPClassUID = uid
    p = tmp_path / "x.dcm"
    ds.save_as(p)
    with pytest.raises(DataError, match=word):
        decode_image(p)


def test_supplemental_palette_is_a_warning_and_pydicom_warnings_go_to_ctx(tmp_path, capsys):
    import warnings

    import pydicom

    ds = pydicom.dcmread(_ct_small())
    ds.add_new(0x00281101, "US", [256, 0, 8])   # Red Palette Color LUT Descriptor: a supplemental palette
    ds.PixelData = ds.PixelData + b"\0" * 8                # excess bytes: pydicom warns while decoding
    p = tmp_path / "pal.dcm"
    ds.save_as(p)
    ctx = RunContext(quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # nothing leaks past medlite
        load_image(p, ctx=ctx)
    assert any("supplemental palette" in w and "ignored" in w for w in ctx.warnings)
    assert any(w.startswith(f"{p}: pydicom:") and "excess padding" in w for w in ctx.warnings)


def test_tiff_page_and_alpha_choices_are_said(tmp_path):
    from PIL import Image

    pages = [Image.new("L", (8, 8), v) for v in (10, 200, 90)]
    tif = tmp_path / "pages.tif"
    pages[0].save(tif, save_all=True, append_images=pages[1:])
    d = decode_image(tif)
    assert d.n_frames == 3 and any("page 1 of 3" in w for w in d.warnings)
    assert np.asarray(decode_image(tif, frame=1).image)[0, 0, 0] == 200 and not decode_image(tif, frame=1).warnings
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(rgba)
    assert any("alpha channel dropped" in w for w in decode_image(rgba).warnings)


def test_nifti_frame_out_of_range_is_an_error():
    nib_tests = pytest.importorskip("nibabel.testing")
    nii = Path(nib_tests.data_path) / "example4d.nii.gz"
    with pytest.raises(DataError, match="slice 300 out of range"):
        load_image(nii, frame=300)
    assert load_image(nii, frame=3).size == load_image(nii).size


# -- issue 26: clean errors and warnings for what is not a scan -------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` (no pixel data: the header is all a bomb needs)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_header_is_one_line_naming_file_and_limit(tmp_path):
    """Issue 26 #8: a PNG header claiming 60000 x 60000 gave a DecompressionBombError traceback."""
    from PIL import Image

    bomb = _png_header_only(tmp_path / "bomb.png", 60000, 60000)
    limit = f"{2 * Image.MAX_IMAGE_PIXELS:,}"
    for load in (lambda: load_image(bomb), lambda: load_images(bomb)):
        with pytest.raises(DataError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and str(bomb) in msg and "3,600,000,000 pixels" in msg and limit in msg


@pytest.mark.parametrize("content, words", [(b"", "empty (0 bytes): not a DICOM file"),
                                            (b"Patient notes\nnot an image at all\n", "not a DICOM file")])
def test_a_dcm_that_is_not_dicom_says_so(tmp_path, content, words):
    """Issue 26 #9: an empty .dcm and a renamed text file said "DICOM file has no pixel data (SOP class None)"."""
    p = tmp_path / "scan.dcm"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_image(p)
    assert str(e.value).startswith(f"{p}: ") and words in str(e.value) and "pixel data" not in str(e.value)


def test_hu_window_on_an_image_that_is_not_ct_warns_once(tmp_path):
    """Issue 26 #13: a CT lung window on an MR or a PNG ran without a warning."""
    lung = (-600.0, 1500.0)
    mr = make_dicom(tmp_path / "mr.dcm", ct_ramp(), modality="MR")
    ct = make_dicom(tmp_path / "ct.dcm", ct_ramp(), RescaleSlope=1, RescaleIntercept=-1024)
    png = tmp_path / "photo.png"
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32), "L").save(png)
    png16 = tmp_path / "g16.png"
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 50).astype(np.uint16)).save(png16)
    for p in (mr, png, png16):
        hu = [w for w in decode_image(p, window=lung).warnings if "Hounsfield" in w]
        assert len(hu) == 1 and "not CT" in hu[0] and "C-600/W1500" in hu[0], (p, hu)
        assert not any("Hounsfield" in w for w in decode_image(p).warnings)     # no window given: quiet
    assert not any("Hounsfield" in w for w in decode_image(ct, window=lung).warnings)
    ctx = RunContext(cache_dir=tmp_path / "cache", quiet=True)
    load_image(mr, window=lung, ctx=ctx)
    assert [w for w in ctx.warnings if "Hounsfield" in w and str(mr) in w] and len(ctx.warnings) == 1


def test_a_tiny_image_warns_that_it_is_not_a_scan(tmp_path):
    """Issue 26 #13: a 1x1 image ran without a warning."""
    one = tmp_path / "dot.png"
    Image.new("L", (1, 1), 128).save(one)
    assert any("1x1 pixels" in w and "not a scan" in w for w in decode_image(one).warnings)
    ok = tmp_path / "small.png"
    Image.new("L", (8, 8), 128).save(ok)
    assert not any("not a scan" in w for w in decode_image(ok).warnings)
