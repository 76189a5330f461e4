"""The image type shared by image loading, the built-in set and datasets (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


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
