"""The base of every recipe model (kept apart so stage option modules can import it without a cycle)."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict


class Closed(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def fraction(v: Optional[float]) -> Optional[float]:
    """Validate a 0..1 fraction; the message says which scale is expected (0.995, not 99.5)."""
    if v is not None and not 0.0 <= v <= 1.0:
        raise ValueError(f"must be a fraction between 0 and 1 (0.995 means 99.5 %), got {v}")
    return v
