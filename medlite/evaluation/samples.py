"""One VQA question about one image: the sample type datasets, calibration sets and checks share (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from medlite.errors import DataError

CLOSED = "closed"
OPEN = "open"


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
            raise DataError(f"sample {self.qid}: no image")
        from medlite.imaging.images import load_image  # lazy: scoring needs no image decoders

        return load_image(self.image_path)
