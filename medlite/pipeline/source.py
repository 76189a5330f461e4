"""The untouched source model of a build: its identity, its cached references, and the model itself
only while someone needs it.

The working model a build transforms is either this very object's model (when no later stage reads
the source: the source is released after its references are cached — one copy of the weights, which
matters at 6 GB per fp32 copy of the full-size model) or a deep copy (when a stage such as distillation
reads the untouched source as teacher).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from medlite import artifacts as af


class Source:
    """The source checkpoint of a build (see the module docstring)."""

    def __init__(self, choice, loaded, label: str, ctx, device=None):
        self.choice, self.label, self.ctx = choice, label, ctx
        self.device = device          # where the references are computed (None/cpu: the host, as before)
        self._loaded: Optional[Any] = loaded
        self.identity = af.source_identity(loaded.source.to_dict(), getattr(loaded.template, "name", None))
        self.name = loaded.name
        self.info = loaded.source.to_dict()

    @property
    def resident(self) -> bool:
        return self._loaded is not None

    def model(self):
        """The untouched source ``LoadedModel`` (reloaded from the checkpoint if it was released)."""
        if self._loaded is None:
            self.ctx.info(f"reloading the source model {self.label} (it was released after its references were cached)")
            self._loaded = self.choice.load(self.ctx)
        return self._loaded

    def working_model(self, *, keep_source: bool):
        """The model compress stages may change: a copy when ``keep_source``, else the source itself
        (which this object then no longer holds)."""
        loaded = self.model()
        if keep_source:
            return copy.deepcopy(loaded)
        self._loaded = None
        return loaded

    def references(self, samples: list, *, max_new_tokens: int, batch_size: int):
        """The source's cached reference outputs on ``samples`` (computed now if not cached)."""
        from medlite.pipeline.references import references_for

        return references_for(self.model, self.identity, samples, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, ctx=self.ctx, device=self.device)
