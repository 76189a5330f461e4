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
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STAGE_NAMES = ("prune", "distill", "quantize", "export", "engines", "check")
COMPONENTS = ("vision", "embed", "decoder")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
# Recipe names become folder names in artifact paths: keep them portable.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Closed(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _fraction(v: Optional[float]) -> Optional[float]:
    # Fractions are easy to confuse with percentages (99.5 vs 0.995): say which one is expected.
    if v is not None and not 0.0 <= v <= 1.0:
        raise ValueError(f"must be a fraction between 0 and 1 (0.995 means 99.5 %), got {v}")
    return v


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


# -- stage options --------------------------------------------------------------------------------
class PruneOptions(Closed):
    """Structured pruning (Volta has no 2:4 sparsity speed-up). Not implemented in this version."""

    method: Literal["heads", "channels", "layers"] = "heads"
    sparsity: float = Field(0.25, gt=0.0, lt=1.0)
    scope: Literal["llm", "vision", "all"] = "llm"


class DistillOptions(Closed):
    """Recover accuracy from the source model as teacher. Not implemented in this version."""

    steps: int = Field(200, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    temperature: float = Field(2.0, gt=0.0)


class QuantizeOptions(Closed):
    """Weight / activation quantization. Not implemented in this version."""

    method: Literal["int8", "w8a8", "int4"] = "int8"
    group_size: Literal[32, 64, 128] = 128
    scope: Literal["llm", "vision", "all"] = "llm"


class ExportOptions(Closed):
    """ONNX export of the vision, embedding and decoder graphs."""

    precision: Literal["fp32", "fp16"] = "fp16"
    # The target's own maximum is checked by the loader (opset > target max names the target).
    opset: int = Field(17, ge=14, le=21)
    components: list[Literal["vision", "embed", "decoder"]] = Field(default_factory=lambda: list(COMPONENTS))

    @field_validator("components")
    @classmethod
    def _components(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must name at least one of {', '.join(COMPONENTS)}")
        dup = sorted({c for c in v if v.count(c) > 1})
        if dup:
            raise ValueError(f"lists {', '.join(dup)} more than once")
        return [c for c in COMPONENTS if c in v]   # canonical order: same recipe → same hash


class EnginesOptions(Closed):
    """A TensorRT build bundle (script + profiles) for the target; engines are built on the device."""

    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp16"
    max_batch: int = Field(1, ge=1, le=64)
    max_prompt_tokens: int = Field(128, ge=1, description="text tokens in a prompt, besides the image tokens")
    max_new_tokens: int = Field(128, ge=1)
    workspace_mb: int = Field(2048, ge=64)


class CheckOptions(Closed):
    """Accuracy gates: the artifact against the uncompressed source on the held-out split.

    A gate set to ``null`` is measured and reported but never fails the build.
    """

    max_closed_acc_drop: Optional[float] = Field(1.0, ge=0.0, description="points (percent of questions)")
    min_agreement: Optional[float] = 0.995
    max_mean_kl: Optional[float] = Field(0.01, ge=0.0, description="nats, first answer token")
    min_vision_cosine: Optional[float] = Field(0.999, ge=-1.0, le=1.0)
    max_samples: Optional[int] = Field(None, ge=1, description="overrides evaluation.max_samples")
    max_new_tokens: int = Field(16, ge=1, le=512)

    @field_validator("min_agreement")
    @classmethod
    def _agreement(cls, v: Optional[float]) -> Optional[float]:
        return _fraction(v)


OPTION_MODELS: dict[str, type[Closed]] = {
    "prune": PruneOptions, "distill": DistillOptions, "quantize": QuantizeOptions,
    "export": ExportOptions, "engines": EnginesOptions, "check": CheckOptions,
}


class StageEntry(Closed):
    """One ``stages`` item: exactly one of the fields is set (``- export: {...}``)."""

    prune: Optional[PruneOptions] = None
    distill: Optional[DistillOptions] = None
    quantize: Optional[QuantizeOptions] = None
    export: Optional[ExportOptions] = None
    engines: Optional[EnginesOptions] = None
    check: Optional[CheckOptions] = None

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        if isinstance(data, str):           # "- export" is shorthand for "- export: {}"
            data = {data: {}}
        if not isinstance(data, dict):
            raise ValueError(f"must be a one-key mapping like 'export: {{...}}', got {type(data).__name__}")
        if len(data) != 1:
            keys = ", ".join(map(str, data)) or "none"
            raise ValueError(f"must have exactly one key (a stage name: {', '.join(STAGE_NAMES)}); "
                             f"got {len(data)}: {keys} — is a '-' missing?")
        # "- check:" with nothing after it means "all defaults".
        return {k: ({} if v is None else v) for k, v in data.items()}

    @property
    def name(self) -> str:
        """The stage name (the entry's only key)."""
        return next(n for n in STAGE_NAMES if getattr(self, n) is not None)

    @property
    def options(self) -> Closed:
        """The stage's options model."""
        return getattr(self, self.name)


class Recipe(Closed):
    """A whole recipe. Build it with :func:`medlite.recipes.load_recipe`, not directly."""

    name: str
    version: str
    description: str = ""
    target: str
    model: Optional[str] = Field(None, description="default checkpoint; --model overrides; none → demo model")
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

    def to_dict(self) -> dict:
        """The resolved recipe as plain data: every default filled in, stages as one-key mappings."""
        d = self.model_dump(mode="json", exclude={"stages"})
        d["stages"] = [{s.name: s.options.model_dump(mode="json")} for s in self.stages]
        return d

    def hashed_dict(self) -> dict:
        """What the artifact version hashes: the resolved recipe without the checkpoint path.

        The checkpoint enters the version through its file hashes instead, so moving a checkpoint
        folder does not change the version and a changed file in place does.
        """
        d = self.to_dict()
        d.pop("model", None)
        return d
