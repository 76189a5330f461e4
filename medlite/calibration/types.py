"""Data types shared by image loading, VQA datasets, calibration sets and checks (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

CLOSED = "closed"
OPEN = "open"


@dataclass(frozen=True)
class MedImage:
    """One 2-D medical image ready for a model: an RGB ``PIL.Image`` plus where it came from.

    ``image_id`` identifies the *source* image (all frames/slices/augmentations of one file share
    it) so that splits can be made disjoint by source image.
    """

    image_id: str
    modality: str            # CT, MR, CR, US, NM, fundus, pathology, ...
    region: str              # chest, head, abdomen, ... or "unknown"
    source: str              # file path or "pydicom:CT_small.dcm" style locator
    loader: Callable[[], "object"] = field(compare=False, repr=False)  # -> PIL.Image.Image (RGB)
    frame: Optional[int] = None
    is_color: bool = False

    def load(self):
        """Return the image as an RGB ``PIL.Image.Image``."""
        return self.loader()


@dataclass(frozen=True)
class VqaSample:
    """One question about one image, with its reference answer."""

    qid: str
    question: str
    answer: str
    answer_type: str                      # CLOSED or OPEN
    image_id: str                         # source image identity (split disjointness)
    modality: str = "unknown"
    region: str = "unknown"
    image_path: Optional[Path] = None
    image_fn: Optional[Callable[[], "object"]] = field(default=None, compare=False, repr=False)
    meta: tuple = ()                      # extra (key, value) pairs from the source format

    def load_image(self):
        """The sample's image as RGB ``PIL.Image.Image`` (DICOM/NIfTI/PNG/JPEG by extension)."""
        if self.image_fn is not None:
            return self.image_fn()
        if self.image_path is None:
            from medlite.errors import DataError

            raise DataError(f"sample {self.qid}: no image")
        from medlite.calibration.images import load_image

        return load_image(self.image_path)
