"""Cross-field recipe rules: stage order, implemented stages, target capabilities, data leakage.

They run on the raw (YAML) data in the same pass as the schema so that every problem is reported
at once; values the schema rejected are skipped here (they already have an error).
"""
from __future__ import annotations

import difflib
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


def semantic_checks(data: dict, *, check_files: bool = False) -> tuple[list[tuple[Loc, str]], list[str]]:
    """Cross-field rules: stage order, implemented stages, each stage's own rules (its registry
    entry's ``rules``), calibration requirements, data-set names, splits and leakage; with
    ``check_files`` also that every data-set file and images folder exists (:func:`dataset_checks`).

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
    errors += dataset_checks(data, check_files=check_files)
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


# -- data sets: names, splits and (when asked) files ----------------------------------------------
def _dataset_sections(data: dict) -> list[tuple[Loc, dict, str]]:
    """``(YAML path, raw section, default split)`` of every data set the build reads."""
    out: list[tuple[Loc, dict, str]] = []
    for key, default in (("calibration", "train"), ("evaluation", "test")):
        if isinstance(data.get(key), dict):
            out.append(((key,), data[key], default))
    stages = data.get("stages")
    for i, item in enumerate(stages if isinstance(stages, list) else []):
        opts = item.get("distill") if isinstance(item, dict) and len(item) == 1 else None
        extra = opts.get("datasets") if isinstance(opts, dict) else None
        for k, d in enumerate(extra if isinstance(extra, list) else []):
            if isinstance(d, dict):
                out.append((("stages", i, "distill", "datasets", k), d, "train"))
    return out


def _relative_note(path: str) -> str:
    import os

    if os.path.isabs(os.path.expanduser(path)):
        return ""
    # The build hands these strings to the readers as they are: relative paths are read from the
    # folder medlite runs in, not from the recipe file's folder.
    return f" (relative paths are read from the folder medlite runs in, {os.getcwd()})"


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _split_error(dataset: str, split: str) -> str | None:
    from medlite.demo.micro_vqa import VIEWS_PER_SOURCE
    from medlite.evaluation.vqa import _SPLIT_ALIASES, SPLITS

    if dataset.startswith("builtin:"):
        allowed = tuple(VIEWS_PER_SOURCE) + ("all",)        # Micro Med-VQA: train, test, all
        if split not in allowed:
            return f"{dataset} has the splits {', '.join(allowed)}, not {split!r}{_suggest(split, allowed)}"
        return None
    if _SPLIT_ALIASES.get(split, split) not in SPLITS:
        return f"unknown split {split!r}{_suggest(split, SPLITS)}; use one of {', '.join(SPLITS)}"
    return None


def dataset_checks(data: dict, *, check_files: bool) -> list[tuple[Loc, str]]:
    """Every data set the build will read (calibration, evaluation, distill ``datasets``): a known
    built-in name, a split that data set has, and — with ``check_files`` — the data-set file or
    folder and the ``images`` folder exist, resolved as the build resolves them (as given, relative
    to the current folder), so a typo fails at ``validate`` / ``plan`` instead of inside a build.

    ``check_files`` is off when an artifact's saved recipe is re-read (verify): its data may live
    elsewhere by now, and the build already read it.
    """
    from pathlib import Path

    from medlite.evaluation.vqa import _SPLIT_ALIASES, BUILTIN_DATASETS, _resolve_json
    from medlite.errors import DataError

    errors: list[tuple[Loc, str]] = []
    for loc, sec, default_split in _dataset_sections(data):
        dataset, split, images = sec.get("dataset", "builtin:micro-med-vqa"), sec.get("split", default_split), \
            sec.get("images")
        if not isinstance(dataset, str) or not isinstance(split, str):
            continue                                     # a type error: the schema reports it
        if dataset.startswith("builtin:"):
            name = dataset.split(":", 1)[1]
            if name not in BUILTIN_DATASETS:
                errors.append((loc + ("dataset",), f"unknown built-in data set {name!r}; available: "
                               + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS)))
                continue
        why = _split_error(dataset, split)
        if why:
            errors.append((loc + ("split",), why))
        if not check_files or dataset.startswith("builtin:"):
            continue
        p = Path(dataset).expanduser()
        if not p.exists():
            errors.append((loc + ("dataset",), f"{dataset}: no such data-set file or folder{_relative_note(dataset)}"))
        elif p.is_dir() and not why:
            try:
                _resolve_json(p, _SPLIT_ALIASES.get(split, split))   # the build's own rule for a folder
            except DataError as e:
                errors.append((loc + ("dataset",), str(e)))
        if isinstance(images, str) and not Path(images).expanduser().is_dir():
            what = "is not a folder" if Path(images).expanduser().exists() else "no such images folder"
            errors.append((loc + ("images",), f"{images}: {what}{_relative_note(images)}"))
    return errors
