"""The stage registry: stages register themselves; the validator, planner and pipeline read what
each stage *declares* (options, capabilities, ordering constraints with their reasons), never its name.

A stage is declared once, torch-free, next to its options model::

    from medlite.recipes.registry import Capabilities, Order, stage

    @stage("tokens", summary="fewer image tokens", runner="mypkg.tokens.run:run",
           caps=Capabilities(changes_weights=True, needs_calibration=True, caches_output=True),
           order=Order(phase=15, why="reduce the image tokens before distillation recovers the accuracy"))
    class TokensOptions(Closed):
        count: int = 16

Built-in stages (and plugins) are found through the ``medlite.stages`` entry-point group (one line in
``pyproject.toml`` names the module that declares the stage); the built-ins are imported on the first
look at :data:`STAGES`, so ``medlite --help`` imports none of them. A stage declared anywhere else (a
test module, a notebook) registers itself the moment its module is imported. Recipes stay closed: a
recipe naming a stage nobody registered is an error with its YAML path.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Callable, Optional

RULE = Callable   # (index, opts, RecipeView) -> (errors, warnings)
PLAN = Callable   # (index, opts, PlanInputs) -> list[str] | dict
ESTIMATE = Callable  # (index, opts, PlanInputs) -> PlanInputs: the sizes after this stage (plans chain)
ENTRY_POINT_GROUP = "medlite.stages"


@dataclass(frozen=True)
class Capabilities:
    """What a stage does, as the pipeline needs to know it (read instead of stage names).

    * ``changes_weights``: a compress stage; the source's references are cached before the first one;
    * ``needs_source``: reads the untouched source model (a distillation teacher): the working model is a copy;
    * ``needs_calibration``: needs the recipe's ``calibration`` section;
    * ``needs_references``: compares with the source's cached reference outputs (the gates);
    * ``gate``: its failure marks the artifact *failed* (written, ``latest`` not moved) instead of
      stopping the build; its options carry the thresholds other stages aim at;
    * ``writes_graphs``: writes the ONNX graphs (what later stages read);
    * ``reads_graphs``: works on the written graphs;
    * ``caches_output``: its whole output is the working model and its :class:`StageResult`, so the
      stage-output cache may store it and a later build may resume after it;
    * ``changes_image_tokens``: the working model's image-token count differs from the source's after
      it (prompts differ in length: only answer positions compare with the source's).
    """

    changes_weights: bool = False
    needs_source: bool = False
    needs_calibration: bool = False
    needs_references: bool = False
    gate: bool = False
    writes_graphs: bool = False
    reads_graphs: bool = False
    caches_output: bool = False
    changes_image_tokens: bool = False


@dataclass(frozen=True)
class Order:
    """Where a stage may stand in a recipe, each constraint with its reason.

    * ``phase``: stages that have one appear in increasing phase (the transformation chain:
      compress → export → engines); ``why`` says why this stage comes after the chain stages before it;
    * ``needs_earlier``: ``((capability, why), ...)``: an earlier stage must have that capability;
    * ``required``: non-empty when every recipe must contain this stage (the text says why).
    """

    phase: Optional[int] = None
    why: str = ""
    needs_earlier: tuple = ()
    required: str = ""


@dataclass(frozen=True)
class StageSpec:
    """One registered stage: everything medlite knows about it.

    * ``options``: the closed options model of ``- <name>: {...}``;
    * ``runner``: ``"module:function"`` of ``run(state, index, options) -> StageResult`` (imported only
      when the stage runs, so validation and planning never import torch), or the function itself;
    * ``plan``: what the stage will do and the bytes it expects, for ``medlite plan``;
    * ``estimate``: the component sizes *after* the stage (pruning shrinks the language model,
      quantization the bytes per weight), so every later stage plans on what it will really get;
    * ``rules``: its cross-field validation rules (:mod:`medlite.recipes.rules`);
    * ``caps`` / ``order``: :class:`Capabilities` and :class:`Order`;
    * ``numerics``: packages whose versions change its numbers (hashed into the artifact version).
    """

    name: str
    options: type
    summary: str
    runner: Optional[object]
    plan: Optional[PLAN] = None
    rules: Optional[RULE] = None
    estimate: Optional[ESTIMATE] = None
    caps: Capabilities = field(default_factory=Capabilities)
    order: Order = field(default_factory=Order)
    numerics: tuple = ()
    max_count: int = 1

    @property
    def implemented(self) -> bool:
        return self.runner is not None

    # the capabilities most callers ask for, spelled as before
    @property
    def changes_weights(self) -> bool:
        return self.caps.changes_weights

    @property
    def needs_source(self) -> bool:
        return self.caps.needs_source

    @property
    def needs_calibration(self) -> bool:
        return self.caps.needs_calibration


class _Registry(MutableMapping):
    """name -> :class:`StageSpec`, ordered by phase (then registration); built-ins load on first use."""

    def __init__(self) -> None:
        self._specs: dict[str, StageSpec] = {}
        self._loaded = False
        self._loading = False
        self._listeners: list[Callable[[], None]] = []

    def _ensure(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            _load_entry_points()
        finally:
            self._loading, self._loaded = False, True
        self._changed()

    def _changed(self) -> None:
        if self._loading:
            return            # one notification after the whole batch
        for fn in list(self._listeners):
            fn()

    def _ordered(self) -> list[str]:
        big = 10 ** 6
        names = list(self._specs)
        return sorted(names, key=lambda n: (self._specs[n].order.phase if self._specs[n].order.phase is not None
                                            else big, names.index(n)))

    def __getitem__(self, name: str) -> StageSpec:
        self._ensure()
        return self._specs[name]

    def __setitem__(self, name: str, spec: StageSpec) -> None:
        self._ensure()
        self._specs[name] = spec
        self._changed()

    def __delitem__(self, name: str) -> None:
        self._ensure()
        del self._specs[name]
        self._changed()

    def __iter__(self):
        self._ensure()
        return iter(self._ordered())

    def __len__(self) -> int:
        self._ensure()
        return len(self._specs)

    def __contains__(self, name) -> bool:
        self._ensure()
        return name in self._specs


STAGES = _Registry()


def _load_entry_points() -> None:
    """Import every module of the ``medlite.stages`` entry-point group (each registers its stage)."""
    import importlib
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        importlib.import_module(ep.value.split(":")[0])


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a stage is registered or removed (the recipe schema rebuilds)."""
    STAGES._listeners.append(listener)


def register_stage(spec: StageSpec, *, replace: bool = False) -> StageSpec:
    """Register ``spec`` under ``spec.name`` (public API). A second registration of a name is an error
    unless it is the same declaration (a module imported twice) or ``replace`` is set."""
    old = STAGES._specs.get(spec.name)
    if old is not None and not replace and old != spec:
        raise ValueError(f"a stage named {spec.name!r} is already registered ({old.summary}); "
                         "pass replace=True to replace it")
    STAGES._specs[spec.name] = spec
    STAGES._changed()
    return spec


def unregister_stage(name: str) -> None:
    """Remove a registered stage (tests and notebooks that declared one)."""
    if STAGES._specs.pop(name, None) is not None:
        STAGES._changed()


def stage(name: str, *, summary: str, runner=None, plan: Optional[PLAN] = None, rules: Optional[RULE] = None,
          estimate: Optional[ESTIMATE] = None, caps: Capabilities = Capabilities(), order: Order = Order(),
          numerics: tuple = (), max_count: int = 1, replace: bool = False):
    """Class decorator on a stage's options model: declares and registers the stage (public API)."""
    def register(options: type) -> type:
        register_stage(StageSpec(name, options, summary, runner, plan, rules, estimate, caps, order,
                                 tuple(numerics), max_count), replace=replace)
        return options
    return register


def stage_names() -> tuple:
    """The registered stage names, in chain order."""
    return tuple(STAGES)


def option_models() -> dict:
    """name -> options model of every registered stage."""
    return {n: s.options for n, s in STAGES.items()}


def numerics_packages(names) -> list[str]:
    """The packages whose versions change the numbers of a recipe with these stages (sorted)."""
    return sorted({p for n in names for p in STAGES[n].numerics})


def chain() -> tuple:
    """The stages with a phase, in the order they must appear."""
    return tuple(n for n in STAGES if STAGES[n].order.phase is not None)


def chain_reason(first: str, second: str, present=None) -> str:
    """Why ``first`` must come before ``second``: the reasons of the chain steps between them — of the
    stages in ``present`` (a recipe's stage names) when given, else of every registered one."""
    lo, hi = STAGES[first].order.phase, STAGES[second].order.phase
    steps = [n for n in chain() if lo < STAGES[n].order.phase <= hi and (present is None or n in present or n == second)]
    return "; ".join(STAGES[n].order.why for n in steps if STAGES[n].order.why)


def providers(capability: str) -> list[str]:
    """The registered stages that have ``capability`` (a :class:`Capabilities` field)."""
    return [n for n, s in STAGES.items() if getattr(s.caps, capability)]


def order_errors(names: list[tuple[int, str]]) -> list[str]:
    """Ordering errors for ``[(index, stage name), ...]`` (the stages of one recipe, in order).

    Each error names both stages with their YAML paths, e.g.
    ``stages[0].export must come after stages[1].quantize (quantize → export: export writes the compressed weights)``.
    """
    errors = _count_errors(names) + _chain_errors(names)
    for i, n in names:
        for cap, why in STAGES[n].order.needs_earlier:
            if any(getattr(STAGES[m].caps, cap) for k, m in names if k < i):
                continue
            later = [(k, m) for k, m in names if k > i and getattr(STAGES[m].caps, cap)]
            if later and STAGES[n].order.phase is not None and STAGES[later[0][1]].order.phase is not None:
                continue   # already reported as a chain-order error
            need = "' or '".join(providers(cap)) or cap
            where = (f"stages[{later[0][0]}].{later[0][1]} comes after it" if later
                     else f"the recipe has no '{need}' stage")
            errors.append(f"stages[{i}].{n} needs an earlier '{need}' stage ({why}); {where}")
    present = {n for _, n in names}
    for n, spec in STAGES.items():
        if spec.order.required and n not in present:
            errors.append(f"stages: a '{n}' stage is required ({spec.order.required})")
    return errors


def _count_errors(names: list[tuple[int, str]]) -> list[str]:
    errors, seen = [], {}
    for i, n in names:
        seen.setdefault(n, []).append(i)
    for n, idx in seen.items():
        spec = STAGES[n]
        if len(idx) > spec.max_count:
            paths = ", ".join(f"stages[{i}].{n}" for i in idx)
            errors.append(f"stages[{idx[spec.max_count]}].{n}: stage '{n}' may appear at most "
                          f"{spec.max_count} time(s); found at {paths}")
    return errors


def _chain_errors(names: list[tuple[int, str]]) -> list[str]:
    errors = []
    ordered = [(i, n) for i, n in names if STAGES[n].order.phase is not None]
    for a in range(len(ordered)):
        for b in range(a + 1, len(ordered)):
            (i, first), (j, second) = ordered[a], ordered[b]
            if STAGES[first].order.phase > STAGES[second].order.phase:
                present = {n for _, n in names}
                errors.append(f"stages[{i}].{first} must come after stages[{j}].{second} "
                              f"({second} → {first}: {chain_reason(second, first, present)})")
    return errors
