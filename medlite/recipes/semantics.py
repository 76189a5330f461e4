"""Cross-field recipe rules: stage order, implemented stages, target capabilities, data leakage.

They run on the raw (YAML) data in the same pass as the schema so that every problem is reported
at once; values the schema rejected are skipped here (they already have an error).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from medlite.recipes import registry

Loc = tuple


def _typed_stages(data: dict) -> list[tuple[int, str, Any]]:
    """``(index, name, typed options or None)`` for every recognisable stage item."""
    out = []
    stages = data.get("stages")
    for i, item in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(item, str):
            item = {item: {}}
        if not (isinstance(item, dict) and len(item) == 1):
            continue
        name, raw = next(iter(item.items()))
        if name not in registry.STAGES:
            continue
        opts = _partial(registry.STAGES[name].options, raw)
        out.append((i, name, opts))
    return out


def _partial(model: type[BaseModel], raw: Any) -> Any:
    """Validate stage options, dropping the keys that fail (their errors are already reported by
    the schema pass) so the remaining valid values still get their cross-field checks.
    Dropped keys fall back to defaults, which are all capability-safe."""
    if not isinstance(raw, dict):
        raw = {}
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        try:
            return model.model_validate({k: v for k, v in raw.items() if k not in bad})
        except ValidationError:
            return None


def semantic_checks(data: dict) -> tuple[list[tuple[Loc, str]], list[str]]:
    """Cross-field rules: stage order, implemented stages, each stage's own rules (its registry
    entry's ``rules``), calibration requirements and data-set leakage.

    Runs on the raw data so it can report alongside schema errors; values that failed the schema
    are skipped here (they already have an error).
    """
    from medlite import __version__
    from medlite.engines.targets import TARGETS
    from medlite.recipes.rules import RecipeView

    errors: list[tuple[Loc, str]] = []
    warnings: list[str] = []
    stages = _typed_stages(data)
    errors += [((), e) for e in registry.order_errors([(i, n) for i, n, _ in stages])]
    target = TARGETS.get(data.get("target")) if isinstance(data.get("target"), str) else None
    view = RecipeView(target=target, stages=stages, by_name={n: (i, o) for i, n, o in stages}, data=data)
    for i, name, opts in stages:
        spec = registry.STAGES[name]
        if not spec.implemented:
            errors.append((("stages", i, name), f"stage '{name}' is not implemented in this version "
                           f"(medlite {__version__}); remove it to build this recipe"))
        if opts is not None and spec.rules is not None:
            errs, warns = spec.rules(i, opts, view)
            errors += errs
            warnings += warns
    needs = [(i, n) for i, n, _ in stages if registry.STAGES[n].needs_calibration]
    if needs and data.get("calibration") is None:
        i, n = needs[0]
        errors.append((("calibration",), f"required by stages[{i}].{n} (calibrates on medical images)"))
    errors += _leakage(data)
    return errors, warnings


def _leakage(data: dict) -> list[tuple[Loc, str]]:
    cal, ev = data.get("calibration"), data.get("evaluation") or {}
    if isinstance(cal, dict) and isinstance(ev, dict):
        cds, eds = cal.get("dataset", "builtin:micro-med-vqa"), ev.get("dataset", "builtin:micro-med-vqa")
        if cds == eds and cal.get("split", "train") == ev.get("split", "test"):
            return [(("calibration", "split"),
                     f"same data set and split as evaluation ({cds}, split {ev.get('split', 'test')}): "
                     "the gates must run on held-out data, never on calibration images")]
    return []
