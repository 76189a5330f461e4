"""A frame/slice out of range says that frames count from 0 and which values are valid (issue 26, item 9)."""
from __future__ import annotations

import numpy as np
import pytest

from medlite.errors import DataError
from medlite.imaging.images import decode_image


def test_dicom_frame_past_the_end(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm")           # 10 frames: 0 .. 9
    assert decode_image(path, frame=9).n_frames == 10
    with pytest.raises(DataError, match=r"frame 10 out of range: frames count from 0 .* --frame takes 0 to 9$"):
        decode_image(path, frame=10)


def test_tiff_page_past_the_end(tmp_path):
    from PIL import Image

    path = tmp_path / "pages.tif"
    pages = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 100, 200)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=r"frame 3 out of range: frames \(pages\) count from 0 .* 0 to 2$"):
        decode_image(path, frame=3)


def test_nifti_slice_past_the_end(tmp_path):
    nib = pytest.importorskip("nibabel")

    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match=r"slice 5 out of range: slices count from 0 .* 0 to 4$"):
        decode_image(path, frame=5)
