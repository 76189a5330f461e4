"""The sweep file: a base recipe, the axes to vary, the targets to recommend for.

```yaml
name: demo-precision                  # folder-safe; the variants' recipes are called <name>.<variant>
recipe: prune-distill-int8            # base recipe: a shipped name or a path (relative to this file)
model: null                           # checkpoint folder (relative to this file); --model wins; none: demo model
overrides: [distill.steps=20]         # applied to every variant (the `medlite build` KEY=VALUE syntax)
axes:                                 # every combination of the values (recipe paths as in overrides)
  quantize.llm: [w8a8, w4a16]
  quantize.vision: [fp16, int8]
variants:                             # and/or an explicit list, each its own overrides
  - {name: mlp50, overrides: [prune.mlp=0.5]}
dataset: {dataset: vqa_rad.json, images: images/, split: test}   # optional: scored on the user's data too
targets: [jetson-xavier-agx-32gb, jetson-xavier-nx-8gb, cpu-x86_64]
```

Every problem in the file is reported at once with its YAML path (and line); a variant whose recipe
breaks a rule is *invalid*: it is listed with the rule's message and never built.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from medlite.errors import RecipeError
from medlite.recipes.base import Closed

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")


class VariantSpec(Closed):
    """One explicit variant: a name and its overrides (on top of the sweep's common ones)."""

    name: str
    overrides: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"must be lower-case letters, digits, '_' or '-' (it names folders), got {v!r}")
        return v


class DatasetSpec(Closed):
    """A data set every variant is also scored on (``medlite eval`` of the artifact on ONNX Runtime)."""

    dataset: str
    images: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = Field(None, ge=1)


class SweepFile(Closed):
    """The sweep file's schema (closed: an unknown key is an error)."""

    name: str
    description: str = ""
    recipe: str
    model: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)
    axes: dict[str, list] = Field(default_factory=dict)
    variants: list[VariantSpec] = Field(default_factory=list)
    dataset: Optional[DatasetSpec] = None
    targets: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return VariantSpec._name(v)

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict) -> dict:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: an axis needs at least one value")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list) -> list:
        from medlite.engines.targets import TARGETS

        bad = [t for t in v if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target(s) {', '.join(bad)}; known: {', '.join(TARGETS)}")
        return v


@dataclass
class Variant:
    """One variant: its overrides and either its resolved recipe or why it is invalid."""

    name: str
    overrides: list[str]
    resolved: object = None            # medlite.recipes.ResolvedRecipe, None when invalid
    errors: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.resolved is not None

    def key(self, model_label: str) -> str:
        """What the variant's artifact depends on besides the source's content: its resolved recipe and the model
        named (a finished variant is reused on a rerun only when this is unchanged)."""
        recipe = self.resolved.recipe.to_dict() if self.resolved is not None else None
        text = json.dumps({"recipe": recipe, "model": model_label}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Sweep:
    """A loaded sweep file and its variants (valid and invalid, in file order)."""

    spec: SweepFile
    source: str
    recipe_path: Path
    variants: list[Variant]

    @property
    def model(self) -> Optional[str]:
        """The sweep's ``model`` resolved relative to the sweep file (None: not given)."""
        if not self.spec.model:
            return None
        p = Path(self.spec.model).expanduser()
        return str(p if p.is_absolute() else Path(self.source).parent / p)


def value_text(value) -> str:
    """An axis value as the right-hand side of an override (YAML flow style: ``0.25``, ``int8``, ``[a, b]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def _slug(value) -> str:
    return re.sub(r"[^a-z0-9]+", "", str(value).lower()) or "x"


def axis_variants(axes: dict[str, list]) -> list[tuple[str, list[str]]]:
    """``(name, overrides)`` for every combination of the axes' values, the first axis varying slowest.

    Names join ``<last path part><value>`` per axis (``llm-w8a8_vision-int8``)."""
    keys = list(axes)
    out = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        parts = [f"{k.split('.')[-1].replace('_', '')}-{_slug(v)}" for k, v in zip(keys, combo)]
        out.append(("_".join(parts), [f"{k}={value_text(v)}" for k, v in zip(keys, combo)]))
    return out


# -- loading --------------------------------------------------------------------------------------
def _schema_errors(exc: ValidationError, index: dict) -> list[str]:
    """Pydantic's errors as ``path: message (line N)``, in medlite's wording."""
    from medlite.recipes.loader import format_path

    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden":
            owner = VariantSpec if "variants" in loc else DatasetSpec if "dataset" in loc[:1] else SweepFile
            msg = f"unknown key; allowed: {', '.join(owner.model_fields)}"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = re.sub(r"^(Value|Assertion) error, ", "", msg).replace("Input should be", "must be")
        line = next((index[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in index), None)
        out.append(f"{format_path(loc)}: {msg}" + (f" (line {line})" if line else ""))
    return out


def _recipe_path(spec: SweepFile, source: str) -> Path:
    """The base recipe: a file relative to the sweep file (or as given), else a shipped recipe name."""
    from medlite.recipes.loader import resolve_recipe_path

    p = Path(spec.recipe).expanduser()
    near = p if p.is_absolute() else Path(source).parent / p
    return near if near.is_file() else resolve_recipe_path(spec.recipe)


def _variant_name(sweep: str, variant: str) -> str:
    """The variant's recipe name (a folder name, at most 64 characters)."""
    name = f"{sweep}.{variant}"
    return name if len(name) <= 64 else f"{name[:55]}.{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _axis_problems(spec: SweepFile, recipe: Path, index: dict) -> list[str]:
    """An axis path the base recipe has no place for (an unknown key or stage) is an error in the sweep file,
    not N invalid variants; rule violations of particular values are left to the variants."""
    from medlite.recipes import load_recipe

    out = []
    for key, values in spec.axes.items():
        ov = f"{key}={value_text(values[0])}"
        try:
            load_recipe(recipe, list(spec.overrides) + [ov])
        except RecipeError as e:
            bad = [m for m in e.errors if m.startswith(f"override '{ov}'")
                   or (f"from override '{ov}'" in m and "unknown key" in m)]
            line = index.get(("axes", key))
            out += [f"axes.{key}: {m}" + (f" (line {line})" if line else "") for m in bad]
    return out


def load_sweep(path) -> Sweep:
    """Read and validate a sweep file and resolve every variant's recipe; RecipeError lists every problem
    in the file at once (a variant that breaks a recipe rule is not an error here: it is marked invalid)."""
    from medlite.recipes import load_recipe
    from medlite.recipes.loader import parse_yaml

    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(source, [f"cannot read the sweep file: {e}"]) from None
    data, index = parse_yaml(text, source)
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as e:
        raise RecipeError(source, _schema_errors(e, index)) from None
    recipe = _recipe_path(spec, source)
    problems = _axis_problems(spec, recipe, index)
    planned = axis_variants(spec.axes) if spec.axes else []
    planned += [(v.name, list(v.overrides)) for v in spec.variants]
    if not planned:
        problems.append("no variants: give axes, variants or both")
    names = [n for n, _ in planned]
    problems += [f"variants: the name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise RecipeError(source, problems)
    variants = []
    for name, own in planned:
        overrides = list(spec.overrides) + own + [f"name={_variant_name(spec.name, name)}"]
        try:
            variants.append(Variant(name, overrides, resolved=load_recipe(recipe, overrides)))
        except RecipeError as e:
            variants.append(Variant(name, overrides, errors=[f"{Path(e.source).name} {m}" for m in e.errors]))
    return Sweep(spec=spec, source=source, recipe_path=recipe, variants=variants)
