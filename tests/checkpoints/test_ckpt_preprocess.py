"""medlite.preprocess equals transformers' SiglipImageProcessor (+ LLaVA's expand2square) on a real image."""
from __future__ import annotations

import numpy as np
import pytest

from ckpt_reference import reference_pixels
from medlite.preprocess import ImageSpec, preprocess


@pytest.mark.parametrize("size,pad", [(384, True), (28, True), (224, False)])
def test_matches_siglip_image_processor(photo, size, pad):
    assert photo.size == (420, 300)  # non-square, so padding matters
    spec = ImageSpec(size=size, pad_to_square=pad)
    got = preprocess(photo, spec)
    want = reference_pixels(photo, size, pad=pad).numpy()
    assert got.shape == want.shape == (1, 3, size, size)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_loaded_spec_comes_from_the_checkpoint(random_ckpt, ctx):
    from medlite.checkpoints import load_model

    loaded = load_model(random_ckpt("tiny", "legacy"), ctx=ctx)
    assert loaded.image_spec.size == 28 and loaded.image_spec.pad_to_square  # image_aspect_ratio: pad
    assert loaded.image_spec.mean == (0.5, 0.5, 0.5) and loaded.image_spec.resample == "bicubic"
