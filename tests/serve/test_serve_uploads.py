"""Uploads for ``medlite serve`` (no model needed): decoding equals medlite's loaders on the file,
bad uploads give readable messages, oversized images are refused from their headers, and every
upload's private folder is gone afterwards."""
from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import png_header_only

from medlite.preprocess import ImageSpec, preprocess
from medlite.serve import uploads
from medlite.serve.uploads import ServeLimits, UploadError, decode_upload, model_view, parse_frame, parse_window

try:
    from medlite.imaging.images import decode_image, load_image
except ImportError:  # before the issue-12 move
    from medlite.calibration.images import decode_image, load_image


def same_pixels(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_dicom_upload_decodes_like_medlite_ask_loads_the_file(ct_small, tmp_path):
    up = decode_upload(ct_small.read_bytes(), "CT_small.dcm", tmp_root=tmp_path)
    assert up.kind == "dicom" and up.n_frames == 1 and up.frame == 0 and up.modality == "CT"
    assert same_pixels(up.image, load_image(ct_small))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,window", [("ct-lung", (-600.0, 1500.0)), ("ct-bone", (400.0, 1800.0))])
def test_window_presets_are_the_loaders_windows(ct_small, tmp_path, key, window):
    up = decode_upload(ct_small.read_bytes(), "x.dcm", window=parse_window(key), tmp_root=tmp_path)
    assert same_pixels(up.image, decode_image(ct_small, window=window).image)
    assert not same_pixels(up.image, load_image(ct_small))   # the preset really changes what the model sees


def test_nifti_slice_selection(tmp_path):
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    up = decode_upload(path.read_bytes(), "brain.nii.gz", frame=3, tmp_root=tmp_path)
    assert up.kind == "nifti" and up.n_frames == 24 and up.frame == 3
    assert same_pixels(up.image, decode_image(path, slice_index=3).image)
    with pytest.raises(UploadError, match=r"brain\.nii\.gz: slice 40 out of range"):
        decode_upload(path.read_bytes(), "brain.nii.gz", frame=40, tmp_root=tmp_path)


def test_model_view_is_exactly_the_model_input(ct_small):
    """Preprocessing the shown image gives the very pixel_values the vision graph receives."""
    img = load_image(ct_small)
    for spec in (ImageSpec(size=56), ImageSpec(size=384, mean=(0.48145466, 0.4578275, 0.40821073),
                                                std=(0.26862954, 0.26130258, 0.27577711))):
        shown = model_view(img, spec)
        assert shown.size == (spec.size, spec.size)
        assert np.array_equal(preprocess([shown], spec), preprocess([img], spec))


def test_corrupt_dicom_gets_a_readable_message(ct_small, tmp_path):
    data = ct_small.read_bytes()
    with pytest.raises(UploadError) as e:
        decode_upload(data[: len(data) // 2], "truncated.dcm", tmp_root=tmp_path)
    assert str(e.value).startswith("truncated.dcm: ") and e.value.status == 400
    assert str(tmp_path) not in str(e.value)          # the private path is never shown
    assert list(tmp_path.iterdir()) == []


def test_text_file_renamed_dcm(tmp_path):
    with pytest.raises(UploadError, match=r"^notes\.dcm: ") as e:
        decode_upload(b"this is a text file, not a scan\n" * 20, "notes.dcm", tmp_root=tmp_path)
    assert e.value.status == 400 and "Traceback" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("side", [50_000, 6_000])   # above Pillow's own bomb limit, and above only ours
def test_huge_png_is_refused_from_its_header(tmp_path, side):
    data = png_header_only(side, side)
    assert len(data) < 200
    with pytest.raises(UploadError, match="pixels") as e:
        decode_upload(data, "huge.png", tmp_root=tmp_path)
    assert e.value.status == 413
    assert list(tmp_path.iterdir()) == []


def test_dicom_frame_size_limit(ct_small, tmp_path):
    with pytest.raises(UploadError, match=r"128 x 128\) has 16,384 pixels") as e:
        decode_upload(ct_small.read_bytes(), "ct.dcm", limits=ServeLimits(max_pixels=10_000), tmp_root=tmp_path)
    assert e.value.status == 413


def test_upload_byte_limit_and_empty_file(ct_small, tmp_path):
    with pytest.raises(UploadError, match="at most 1,000") as e:
        decode_upload(ct_small.read_bytes(), "ct.dcm", limits=ServeLimits(max_upload_bytes=1000), tmp_root=tmp_path)
    assert e.value.status == 413
    with pytest.raises(UploadError, match="empty"):
        decode_upload(b"", "ct.dcm", tmp_root=tmp_path)


def test_upload_lives_in_a_private_folder_only_while_decoding(ct_small, tmp_path, monkeypatch):
    seen = []
    real = uploads._decode

    def spy(path, kind, frame, window):
        seen.append((stat.S_IMODE(path.parent.stat().st_mode), stat.S_IMODE(path.stat().st_mode), path))
        return real(path, kind, frame, window)

    monkeypatch.setattr(uploads, "_decode", spy)
    decode_upload(ct_small.read_bytes(), "Doe^John.dcm", tmp_root=tmp_path)
    (folder_mode, file_mode, path), = seen
    assert folder_mode == 0o700 and file_mode == 0o600
    assert path.name == "upload.dcm"                   # the user's file name is not used on disk
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_form_fields():
    assert parse_frame(None) is None and parse_frame(" 3 ") == 3
    for bad in ("x", "-1", "1.5"):
        with pytest.raises(UploadError):
            parse_frame(bad)
    assert parse_window(None) == "auto" and parse_window("ct-bone") == (400.0, 1800.0)
    with pytest.raises(UploadError, match="choose one of auto"):
        parse_window("C40W400")
