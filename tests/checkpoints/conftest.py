"""Fixtures for the checkpoint tests: tiny random checkpoints in every format, a real non-square image."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def ctx(tmp_path_factory):
    from medlite.context import RunContext

    return RunContext(cache_dir=tmp_path_factory.mktemp("cache"), quiet=True)


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real, non-square image: an immunohistochemistry slide from scikit-image, cropped to 300×420."""
    from skimage import data

    return Image.fromarray(np.ascontiguousarray(data.immunohistochemistry()[40:340, 20:440]))


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    """``random_ckpt(preset, fmt)`` → folder of a random checkpoint (cached per session)."""
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    made: dict = {}

    def make(preset: str = "tiny", fmt: str = "legacy", **kw):
        key = (preset, fmt, tuple(sorted(kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{preset}-{fmt}")
            made[key] = write_random_checkpoint(preset, out / "ckpt", fmt=fmt, seed=7, **kw)
        return made[key]

    return make
