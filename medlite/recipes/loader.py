"""Load a recipe: YAML → overrides → schema → semantic checks, reporting every error at once.

Errors name their YAML path (``stages[2].quantize.group_size: must be one of 32, 64, 128 (got 48)``)
and, where known, the line in the file or the command-line override that set the value. Nothing
here loads weights: validation is complete before any model is touched.
"""
from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from medlite.errors import RecipeError
from medlite.recipes import registry
from medlite.recipes import schema
from medlite.recipes.schema import Recipe
from medlite.recipes.semantics import semantic_checks

Loc = tuple  # a YAML path: ("stages", 2, "quantize", "group_size")


@dataclass
class ResolvedRecipe:
    """A validated recipe, where it came from, and non-fatal findings."""

    recipe: Recipe
    source: str
    overrides: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        """The resolved recipe (every default filled in) as YAML, as saved in ``recipe.yaml``."""
        return yaml.safe_dump(self.recipe.to_dict(), sort_keys=False, allow_unicode=True)


# -- paths ----------------------------------------------------------------------------------------
def format_path(loc: Loc) -> str:
    """``("stages", 2, "quantize", "group_size")`` → ``stages[2].quantize.group_size``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(recipe)"


_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def parse_path(text: str) -> Loc:
    """``stages[0].export.precision`` → ``("stages", 0, "export", "precision")``; ValueError if malformed."""
    loc: list = []
    for seg in text.split("."):
        m = _SEGMENT.match(seg)
        if not m:
            raise ValueError(f"malformed key path '{text}' (at '{seg}')")
        loc.append(m.group(1))
        loc.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(loc)


# -- YAML with line numbers -----------------------------------------------------------------------
def _line_index(node: yaml.Node, loc: Loc, index: dict, errors: list[str]) -> None:
    """Record the 1-based line of every path; report duplicate keys (PyYAML silently keeps the last)."""
    index[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for k, v in node.value:
            key = k.value
            if key in seen:
                errors.append(f"{format_path(loc + (key,))}: duplicate key (line {k.start_mark.line + 1})")
            seen.add(key)
            index[loc + (key,)] = k.start_mark.line + 1
            _line_index(v, loc + (key,), index, errors)
            index[loc + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_index(v, loc + (i,), index, errors)


def parse_yaml(text: str, source: str) -> tuple[dict, dict]:
    """Parse recipe text into ``(data, line_index)``; RecipeError for syntax errors and duplicate keys."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(source, [f"{where}invalid YAML: {getattr(e, 'problem', None) or e}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(source, [f"a recipe must be a YAML mapping (name, version, target, stages, ...), "
                                   f"got {type(data).__name__}"])
    index: dict = {}
    errors: list[str] = []
    if node is not None:
        _line_index(node, (), index, errors)
    if errors:
        raise RecipeError(source, errors)
    return data, index


# -- overrides ------------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, dict[Loc, str], list[str]]:
    """Apply ``key=value`` overrides to raw recipe data (in place) and return what was set.

    ``key`` is a path (``stages[0].export.precision``) or starts with a stage name when that stage is
    unique in the recipe (``export.precision``, ``check.min_agreement``). Values are YAML scalars
    (``fp32``, ``0.99``, ``null``, ``[vision, embed]``). Returns ``(data, {path: override}, errors)``;
    unknown keys inside a known section are reported later by the schema, with the override named.
    """
    set_paths: dict[Loc, str] = {}
    errors: list[str] = []
    for ov in overrides:
        key, eq, text = ov.partition("=")
        if not eq or not key.strip():
            errors.append(f"override '{ov}': expected KEY=VALUE, e.g. export.precision=fp32")
            continue
        try:
            loc = parse_path(key.strip())
            value = yaml.safe_load(text) if text.strip() else None
        except (ValueError, yaml.YAMLError) as e:
            errors.append(f"override '{ov}': {e}")
            continue
        loc, err = _resolve_stage_alias(data, loc)
        if err is None:
            err = _set(data, loc, value)
        if err:
            errors.append(f"override '{ov}': {err}")
        else:
            set_paths[loc] = ov
    return data, set_paths, errors


def _resolve_stage_alias(data: dict, loc: Loc) -> tuple[Loc, Optional[str]]:
    head = loc[0]
    if head in Recipe.model_fields:
        return loc, None
    if head not in registry.STAGES:
        names = list(Recipe.model_fields) + list(registry.STAGES)
        return loc, f"unknown key '{head}'{_suggest(head, names)}"
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    hits = [i for i, s in enumerate(stages) if (s == head) or (isinstance(s, dict) and head in s)]
    if not hits:
        return loc, f"the recipe has no '{head}' stage (its stages: {', '.join(_stage_names(stages)) or 'none'})"
    if len(hits) > 1:
        paths = " or ".join(f"stages[{i}].{head}" for i in hits)
        return loc, f"'{head}' appears {len(hits)} times; address one as {paths}"
    return ("stages", hits[0]) + loc, None


def _stage_names(stages: list) -> list[str]:
    return [s if isinstance(s, str) else next(iter(s), "?") for s in stages if isinstance(s, (str, dict))]


def _set(data: dict, loc: Loc, value: Any) -> Optional[str]:
    cur: Any = data
    for n, part in enumerate(loc[:-1]):
        nxt = loc[n + 1]
        if isinstance(part, int):
            if not isinstance(cur, list) or part >= len(cur):
                size = len(cur) if isinstance(cur, list) else 0
                return f"{format_path(loc[:n + 1])}: index out of range ({size} item(s))"
            if isinstance(cur[part], str) and cur[part] in registry.STAGES:
                cur[part] = {cur[part]: {}}           # "- export" shorthand → mapping
        elif not isinstance(cur, dict):
            return f"{format_path(loc[:n])} is not a mapping"
        else:
            if cur.get(part) is None:
                cur[part] = [] if isinstance(nxt, int) else {}
        cur = cur[part]
    last = loc[-1]
    if isinstance(last, int):
        if not isinstance(cur, list) or last >= len(cur):
            return f"{format_path(loc)}: index out of range"
    elif not isinstance(cur, dict):
        return f"{format_path(loc[:-1])} is not a mapping"
    cur[last] = value
    return None


# -- pydantic errors → path messages --------------------------------------------------------------
def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(loc: Loc) -> Optional[type[BaseModel]]:
    """The pydantic model that validates the mapping at ``loc`` (for 'did you mean' suggestions)."""
    tp: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if args else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return None
        while typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def convert_errors(exc: ValidationError, prefix: Loc = ()) -> list[tuple[Loc, str]]:
    """Turn pydantic's errors into ``(path, message)`` pairs in medlite's wording."""
    out = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        kind, msg, value = err["type"], err["msg"], err.get("input")
        if kind == "extra_forbidden":
            model = _model_at(loc[:-1])
            hint = _suggest(loc[-1], model.model_fields) if model else ""
            allowed = f"; allowed: {', '.join(model.model_fields)}" if model else ""
            msg = f"unknown key{hint}{allowed}"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            choices = [c.strip().strip("'\"") for c in re.split(r", | or ", expected) if c.strip()]
            msg = f"must be one of {', '.join(choices)} (got {_short(value)}){_suggest(value, choices)}"
        elif kind in ("value_error", "assertion_error"):
            msg = re.sub(r"^(Value|Assertion) error, ", "", msg)
        elif kind in ("model_type", "dict_type"):
            msg = f"must be a mapping (got {_short(value)})"
        else:
            msg = msg.replace("Input should be", "must be")
            msg = (msg.replace("greater than or equal to", "≥").replace("less than or equal to", "≤")
                   .replace("greater than", ">").replace("less than", "<"))
            if not isinstance(value, (dict, list)):
                msg += f" (got {_short(value)})"
        out.append((loc, msg))
    return out


# -- entry points ---------------------------------------------------------------------------------
def builtin_dir() -> Path:
    """Folder of the recipes shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "recipes_builtin"


def builtin_recipes() -> dict[str, Path]:
    """Shipped recipes: ``name → path`` (the name is the file stem, equal to the recipe's ``name``)."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.yaml"))}


def resolve_recipe_path(arg: str) -> Path:
    """A recipe file path, or the shipped recipe called ``arg`` (``xavier-agx-fp16``)."""
    p = Path(arg)
    if p.is_file():
        return p
    shipped = builtin_recipes()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if stem in shipped and (not p.parent.parts or p.parent.name in ("recipes", "recipes_builtin")):
        return shipped[stem]
    raise RecipeError(arg, [f"no such recipe file, and not a shipped recipe{_suggest(stem, shipped)} "
                            f"(shipped: {', '.join(shipped) or 'none'}; see `medlite recipes ls`)"])


def validate_data(data: dict, source: str, overrides: list[str] | None = None,
                  line_index: dict | None = None, *, check_files: bool = False) -> ResolvedRecipe:
    """Validate raw recipe data (after YAML parsing); raise RecipeError listing every problem.

    ``check_files``: also check that the data-set files and images folders exist (``validate``,
    ``plan`` and ``build`` do; re-reading an artifact's saved recipe does not)."""
    overrides = list(overrides or [])
    line_index = line_index or {}
    data, set_paths, errors = apply_overrides(data, overrides)
    pairs: list[tuple[Loc, str]] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        pairs += convert_errors(e)
    sem_errors, warnings = semantic_checks(data, check_files=check_files)
    pairs += sem_errors

    def where(loc: Loc) -> tuple[str, float]:
        for n in range(len(loc), 0, -1):
            if loc[:n] in set_paths:
                return f" (from override '{set_paths[loc[:n]]}')", float("inf")
            if loc[:n] in line_index:
                return f" (line {line_index[loc[:n]]})", line_index[loc[:n]]
        return "", float("inf")

    # In file order (overrides and whole-recipe findings last), as an editor would walk them.
    located = [((f"{format_path(loc)}: {msg}" if loc else msg),) + where(loc) for loc, msg in pairs]
    located = sorted(enumerate(located), key=lambda t: (t[1][2], t[0]))
    messages = errors + [text + suffix for _, (text, suffix, _line) in located]
    if messages or recipe is None:
        raise RecipeError(source, messages or ["invalid recipe"])
    return ResolvedRecipe(recipe=recipe, source=source, overrides=overrides, warnings=warnings)


def load_recipe(path_or_name: str | Path, overrides: list[str] | None = None, *,
                check_files: bool = True) -> ResolvedRecipe:
    """Load, override and validate a recipe file or shipped recipe name; raise RecipeError with all errors
    (data-set files and images folders included unless ``check_files`` is False)."""
    path = resolve_recipe_path(str(path_or_name))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(str(path), [f"cannot read: {e}"]) from None
    data, index = parse_yaml(text, str(path))
    return validate_data(data, str(path), overrides, index, check_files=check_files)


def stage_entry(name: str, **options):
    """Build one stage entry in code (tests, programmatic recipes)."""
    return schema.entry_model().model_validate({name: options})
