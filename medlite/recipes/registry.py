"""The closed stage registry and the stage ordering rules, as data.

Everything the validator knows about stages is declared here: which stages exist, which options
model each takes, whether this version implements it, how often it may appear, and the order
rules. The loader (:mod:`medlite.recipes.loader`) only interprets these tables.
"""
from __future__ import annotations

from dataclasses import dataclass

from medlite.recipes.schema import OPTION_MODELS, STAGE_NAMES, Closed


@dataclass(frozen=True)
class StageSpec:
    """What the registry knows about one stage."""

    name: str
    options: type[Closed]
    summary: str
    implemented: bool
    needs_calibration: bool = False
    max_count: int = 1


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("prune", OPTION_MODELS["prune"], "structured pruning of heads / channels / layers",
              implemented=False, needs_calibration=True),
    StageSpec("distill", OPTION_MODELS["distill"], "distillation from the source model",
              implemented=False, needs_calibration=True),
    StageSpec("quantize", OPTION_MODELS["quantize"], "INT8 / W8A8 / INT4 weight quantization",
              implemented=False, needs_calibration=True),
    StageSpec("export", OPTION_MODELS["export"], "vision / embed / decoder ONNX graphs + runtime config",
              implemented=True),
    StageSpec("engines", OPTION_MODELS["engines"], "TensorRT 8.5 build bundle (engines are built on the device)",
              implemented=True),
    StageSpec("check", OPTION_MODELS["check"], "accuracy gates against the source model on the held-out split",
              implemented=True),
)}
assert tuple(STAGES) == STAGE_NAMES  # the schema and the registry name the same closed set

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
