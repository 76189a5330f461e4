"""Error types. Every user-facing error names the file, key or value at fault."""
from __future__ import annotations


class MedliteError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits 2."""


class CheckpointError(MedliteError):
    """A checkpoint folder cannot be loaded as asked (missing/leftover tensors, bad files...)."""


class DataError(MedliteError):
    """An image, dataset or calibration file is missing or unreadable."""


class OutputError(MedliteError):
    """An output path (``--out``) cannot be written: checked before any work starts."""


class ExportError(MedliteError):
    """An export produced or would produce an invalid graph."""


class RecipeError(MedliteError):
    """A recipe is invalid; ``errors`` lists every problem with its YAML path."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, list(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error(s)\n{lines}")


class GateFailure(MedliteError):
    """One or more accuracy gates failed (the artifact is kept and marked failed)."""
