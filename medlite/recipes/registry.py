"""The closed stage registry and the stage ordering rules, as data.

Everything the validator knows about stages is declared here: which stages exist, which options
model each takes, whether this version implements it, how often it may appear, and the order
rules. The loader (:mod:`medlite.recipes.loader`) only interprets these tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from medlite.compress.prune.options import PruneOptions
from medlite.compress.prune.options import plan as prune_plan
from medlite.compress.prune.options import rules as prune_rules
from medlite.recipes import rules
from medlite.recipes.base import Closed
from medlite.recipes.options import CheckOptions, EnginesOptions, ExportOptions, QuantizeOptions
from medlite.recipes.planning import check_plan, engines_plan, export_plan, quantize_plan

from medlite.compress.distill.options import DistillOptions
from medlite.compress.distill.options import plan as distill_plan
from medlite.compress.distill.options import rules as distill_rules

RULE = Callable   # (index, opts, RecipeView) -> (errors, warnings)
PLAN = Callable   # (index, opts, PlanInputs) -> list[str] | dict


@dataclass(frozen=True)
class StageSpec:
    """One registry entry: everything medlite knows about a stage.

    * ``options``: the closed options model of ``- <name>: {...}``;
    * ``runner``: ``"module:function"`` of ``run(state, index, options) -> StageResult`` (imported only
      when the stage runs, so validation and planning never import torch), or the function itself;
    * ``plan``: what the stage will do and the bytes it expects, for ``medlite plan``;
    * ``rules``: its cross-field validation rules (:mod:`medlite.recipes.rules`);
    * ``changes_weights``: a compress stage — the source's references are cached before the first one;
    * ``needs_source``: it reads the untouched source model (a distillation teacher), so the working
      model must be a copy;
    * ``numerics``: packages whose versions change its numbers (hashed into the artifact version).
    """

    name: str
    options: type[Closed]
    summary: str
    runner: Optional[object]
    plan: Optional[PLAN] = None
    rules: Optional[RULE] = None
    needs_calibration: bool = False
    changes_weights: bool = False
    needs_source: bool = False
    numerics: tuple = ()
    max_count: int = 1

    @property
    def implemented(self) -> bool:
        return self.runner is not None


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("prune", PruneOptions, "structured pruning of MLP channels / KV groups / layers (dense, smaller)",
              "medlite.compress.prune.stage:run", prune_plan, prune_rules, needs_calibration=True,
              changes_weights=True, numerics=("torch", "transformers")),
    StageSpec("distill", DistillOptions, "distillation from the untouched source model as teacher",
              "medlite.compress.distill.stage:run", distill_plan, distill_rules,
              needs_calibration=True, changes_weights=True, needs_source=True, numerics=("torch", "transformers")),
    StageSpec("quantize", QuantizeOptions, "INT8 Q/DQ (TensorRT) / W8A8 SmoothQuant / W4A16 GPTQ-AWQ (ONNX Runtime)",
              "medlite.compress.quantize_stage:run", quantize_plan, rules.quantize_rules, needs_calibration=True,
              changes_weights=True, numerics=("torch", "transformers", "llmcompressor", "compressed-tensors",
                                              "onnxruntime")),
    StageSpec("export", ExportOptions, "vision / embed / decoder ONNX graphs + runtime config",
              "medlite.build.stages.export:run", export_plan, rules.export_rules, numerics=("torch", "transformers",
                                                                                          "onnx")),
    StageSpec("engines", EnginesOptions, "TensorRT 8.5 build bundle (engines are built on the device)",
              "medlite.build.stages.engines:run", engines_plan, rules.engines_rules),
    StageSpec("check", CheckOptions, "accuracy gates against the source model on the held-out split",
              "medlite.build.stages.check:run", check_plan, rules.check_rules, numerics=("onnxruntime",)),
)}
STAGE_NAMES: tuple = tuple(STAGES)
OPTION_MODELS: dict = {n: s.options for n, s in STAGES.items()}


def numerics_packages(names) -> list[str]:
    """The packages whose versions change the numbers of a recipe with these stages (sorted)."""
    return sorted({p for n in names for p in STAGES[n].numerics})


# Stages of the transformation chain must appear in this relative order (any subset may be used):
# compress the weights first, then export them, then build engines from the exported graphs.
CHAIN: tuple[str, ...] = ("prune", "distill", "quantize", "export", "engines")
CHAIN_WHY = {
    ("prune", "distill"): "distillation recovers the accuracy pruning lost",
    ("distill", "quantize"): "quantize the final, distilled weights",
    ("quantize", "export"): "export writes the compressed weights",
    ("export", "engines"): "engines are built from the exported ONNX graphs",
}

# stage -> a stage that must appear *earlier* in the list, and why.
REQUIRES_EARLIER: dict[str, tuple[str, str]] = {
    "engines": ("export", "engines are built from the exported ONNX graphs"),
    "check": ("export", "the gates compare the exported graphs with the source model"),
}

# Stages every recipe must contain, and why.
REQUIRED: dict[str, str] = {
    "export": "this version's artifacts are ONNX graphs",
}


def chain_reason(first: str, second: str) -> str:
    """Why ``first`` must come before ``second`` in :data:`CHAIN`."""
    i, j = CHAIN.index(first), CHAIN.index(second)
    return "; ".join(CHAIN_WHY[(CHAIN[k], CHAIN[k + 1])] for k in range(i, j))


def order_errors(names: list[tuple[int, str]]) -> list[str]:
    """Ordering errors for ``[(index, stage name), ...]`` (the stages of one recipe, in order).

    Each error names both stages with their YAML paths, e.g.
    ``stages[0].export must come after stages[1].quantize (export writes the compressed weights)``.
    """
    errors: list[str] = []
    seen: dict[str, list[int]] = {}
    for i, n in names:
        seen.setdefault(n, []).append(i)
    for n, idx in seen.items():
        spec = STAGES[n]
        if len(idx) > spec.max_count:
            paths = ", ".join(f"stages[{i}].{n}" for i in idx)
            errors.append(f"stages[{idx[spec.max_count]}].{n}: stage '{n}' may appear at most "
                          f"{spec.max_count} time(s); found at {paths}")
    chain = [(i, n) for i, n in names if n in CHAIN]
    for a in range(len(chain)):
        for b in range(a + 1, len(chain)):
            (i, first), (j, second) = chain[a], chain[b]
            if CHAIN.index(first) > CHAIN.index(second):
                errors.append(f"stages[{i}].{first} must come after stages[{j}].{second} "
                              f"({second} → {first}: {chain_reason(second, first)})")
    for i, n in names:
        if n in REQUIRES_EARLIER:
            need, why = REQUIRES_EARLIER[n]
            earlier = [k for k, m in names if m == need and k < i]
            if not earlier:
                later = [k for k, m in names if m == need and k > i]
                if later and n in CHAIN and need in CHAIN:
                    continue   # already reported above as a chain-order error
                where = (f"stages[{later[0]}].{need} comes after it" if later
                         else f"the recipe has no '{need}' stage")
                errors.append(f"stages[{i}].{n} needs an earlier '{need}' stage ({why}); {where}")
    present = {n for _, n in names}
    for n, why in REQUIRED.items():
        if n not in present:
            errors.append(f"stages: a '{n}' stage is required ({why})")
    return errors
