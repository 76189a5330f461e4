"""Typed, closed recipe models (pydantic v2, ``extra="forbid"`` everywhere).

A recipe is YAML::

    name: xavier-agx-fp16
    version: 1.0.0
    target: jetson-xavier-agx-32gb
    evaluation: {dataset: builtin:micro-med-vqa, split: test}
    stages:
      - export: {precision: fp16, opset: 17}
      - check: {max_closed_acc_drop: 1.0, min_agreement: 0.995}

Each ``stages`` item is a one-key mapping whose key names a stage from the closed registry
(:mod:`medlite.recipes.registry`). Field validators here only check single values; everything that
relates several fields (stage order, target capabilities) lives in :mod:`medlite.recipes.loader` so
that *all* errors are reported together. See docs/recipes.md for the reference.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import Field, create_model, field_validator, model_validator

from medlite.recipes.base import Closed
from medlite.recipes.options import COMPONENTS, CheckOptions, EnginesOptions, ExportOptions, QuantizeOptions
from medlite.recipes import registry

# Re-exported: callers import the option models and the base from here.
__all__ = ["Closed", "COMPONENTS", "CalibrationSpec", "CheckOptions", "EnginesOptions", "EvaluationSpec",
           "ExportOptions", "QuantizeOptions", "Recipe", "StageEntry", "entry_model"]

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
# Recipe names become folder names in artifact paths: keep them portable.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


# -- data sets ------------------------------------------------------------------------------------
class CalibrationSpec(Closed):
    """Images + questions used to calibrate compression stages (never used for evaluation)."""

    dataset: str = "builtin:micro-med-vqa"
    images: Optional[str] = Field(None, description="image folder for file datasets (VQA-RAD, SLAKE, ...)")
    split: str = "train"
    samples: int = Field(128, ge=1, le=100_000)
    seed: int = 0
    allow_synthetic: bool = Field(False, description="allow padding with synthetic images when the set is short")


class EvaluationSpec(Closed):
    """The held-out split the accuracy gates run on."""

    dataset: str = "builtin:micro-med-vqa"
    images: Optional[str] = None
    split: str = "test"
    max_samples: Optional[int] = Field(None, ge=1)


class _StageEntryBase(Closed):
    """One ``stages`` item: exactly one of the fields is set (``- export: {...}``).

    The fields — one per registered stage, typed by that stage's options model — are generated from
    the registry (:func:`entry_model`) and regenerated whenever a stage registers itself.
    """

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        if isinstance(data, str):           # "- export" is shorthand for "- export: {}"
            data = {data: {}}
        if not isinstance(data, dict):
            raise ValueError(f"must be a one-key mapping like 'export: {{...}}', got {type(data).__name__}")
        if len(data) != 1:
            keys = ", ".join(map(str, data)) or "none"
            raise ValueError(f"must have exactly one key (a stage name: {', '.join(registry.stage_names())}); "
                             f"got {len(data)}: {keys} — is a '-' missing?")
        # "- check:" with nothing after it means "all defaults".
        return {k: ({} if v is None else v) for k, v in data.items()}

    @property
    def name(self) -> str:
        """The stage name (the entry's only key)."""
        return next(n for n in type(self).model_fields if getattr(self, n) is not None)

    @property
    def options(self) -> Closed:
        """The stage's options model."""
        return getattr(self, self.name)


def _entry_model() -> type:
    return create_model("StageEntry", __base__=_StageEntryBase,
                        **{n: (Optional[m], None) for n, m in registry.option_models().items()})


StageEntry = _entry_model()


def entry_model() -> type:
    """The current ``StageEntry`` model (one optional field per registered stage)."""
    return StageEntry


class Recipe(Closed):
    """A whole recipe. Build it with :func:`medlite.recipes.load_recipe`, not directly."""

    name: str
    version: str
    description: str = ""
    target: str
    model: Optional[str] = Field(None, description="default checkpoint; --model overrides; none → demo model")
    device: Optional[str] = Field(None, description="default torch device (auto, cpu, cuda, cuda:N); --device "
                                                    "overrides; unset: auto. Written out only when set")
    calibration: Optional[CalibrationSpec] = None
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    stages: list[StageEntry] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be lower-case letters, digits, '.', '_' or '-' (it becomes a folder name), "
                             f"got {v!r}")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        # YAML reads "version: 1.0" as a float: name the problem instead of a type error.
        if not isinstance(v, str) or not _SEMVER.match(v):
            raise ValueError(f"must be a semantic version string like 1.0.0, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: Optional[str]) -> Optional[str]:
        from medlite.devices import DeviceError, parse_device

        if v is None:
            return v
        try:
            return parse_device(v, where="device")
        except DeviceError as e:
            raise ValueError(str(e).split(": ", 1)[1]) from None

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        from medlite.engines.targets import TARGETS, unknown_target_message

        if v not in TARGETS:
            raise ValueError(unknown_target_message(v))
        return v

    def stage(self, name: str) -> Optional[Closed]:
        """Options of the first stage called ``name`` (None when the recipe has none)."""
        return next((s.options for s in self.stages if s.name == name), None)

    def stage_with(self, capability: str) -> Optional[Closed]:
        """Options of the first stage declaring ``capability`` (e.g. ``"gate"``: the thresholds every
        stage aims at; ``"needs_references"``: the questions and generation length of the references)."""
        return next((s.options for s in self.stages if getattr(registry.STAGES[s.name].caps, capability)), None)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data: every default filled in, stages as one-key mappings."""
        # ``device`` appears only when the recipe sets it: recipes without it resolve (recipe.yaml) and
        # hash exactly as before the field existed (docs/gpu-builds.md).
        d = self.model_dump(mode="json", exclude={"stages"} | ({"device"} if self.device is None else set()))
        d["stages"] = [{s.name: s.options.model_dump(mode="json")} for s in self.stages]
        return d

    def hashed_dict(self) -> dict:
        """What the artifact version hashes: the resolved recipe without the checkpoint path.

        The checkpoint enters the version through its file hashes instead, so moving a checkpoint
        folder does not change the version and a changed file in place does.
        """
        d = self.to_dict()
        d.pop("model", None)
        # The device spelling is a preference (``auto`` differs per machine): the build hashes the
        # device it resolved to instead, and only when that is not the CPU (medlite.pipeline.pipeline).
        d.pop("device", None)
        return d


def _rebuild() -> None:
    """A stage registered after import: regenerate ``StageEntry`` and the ``Recipe`` field that holds it."""
    global StageEntry
    StageEntry = _entry_model()
    Recipe.model_fields["stages"].annotation = list[StageEntry]
    Recipe.model_rebuild(force=True)


registry.on_change(_rebuild)
