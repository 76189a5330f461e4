"""Options, validation rules, plan and estimate of the ``tokens`` stage (torch-free: the registry imports this).

Recipe form::

    - tokens:
        count: 16          # image tokens after the stage: a square the tower's grid can produce
        method: avg        # avg | salient (docs/image-tokens.md measures them against each other)
        heldout_samples: 32  # held-out calibration pairs answered before/after pooling (report; 0: skip)

The vision tower's ``side × side`` output grid is pooled to ``count`` tokens *before* the projector
(:mod:`medlite.image_tokens` has the geometry and the padding rule for odd grids). A later
``distill`` stage recovers the accuracy with the untouched source (all tokens) as teacher.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pydantic import Field

from medlite.errors import RecipeError
from medlite.image_tokens import METHODS, achievable_counts, geometry, grid_side
from medlite.recipes.base import Closed
from medlite.recipes.registry import Capabilities, Order, StageSpec, register_stage

STAGE = "tokens"


class TokensOptions(Closed):
    """Fewer image tokens: pool the vision tower's token grid before the projector."""

    count: int = Field(..., ge=1, description="image tokens after the stage: a square the tower's grid can produce "
                                              "(27×27 = 729 → 196, 81, 49, …; the demo's 7×7 = 49 → 16, 9, 4, 1)")
    method: Literal["avg", "salient"] = Field("avg", description="avg: the mean of each window; salient: each "
                                              "token weighted by its feature norm inside its window")
    heldout_samples: int = Field(32, ge=0, description="held-out calibration pairs answered before and after "
                                                       "pooling (agreement in the report; 0: not measured)")


def rules(index: int, opts: TokensOptions, view) -> tuple[list, list]:
    """``count`` must be a square (a grid produces nothing else; the exact set needs the model, checked by
    :func:`estimate` before any weight loads); without a later ``distill`` stage: a warning."""
    errors: list = []
    warnings: list = []
    side = math.isqrt(opts.count)
    if side * side != opts.count:
        errors.append((("stages", index, STAGE, "count"),
                       f"{opts.count} is not a square number of tokens: pooling a square grid gives a square grid "
                       f"(e.g. {max(side, 1) ** 2} or {(side + 1) ** 2})"))
    later = [i for name, (i, _) in (getattr(view, "by_name", {}) or {}).items() if name == "distill" and i > index]
    if not later:
        warnings.append(f"stages[{index}].tokens without a later distill stage: the model never learns to read "
                        "the pooled tokens (add '- distill' after it; docs/image-tokens.md)")
    return errors, warnings


def _geometry(index: int, opts: TokensOptions, tokens_in: int):
    try:
        return geometry(tokens_in, opts.count)
    except ValueError as e:
        raise RecipeError(f"stages[{index}].tokens.count", [str(e)]) from None


def plan(index: int, opts: TokensOptions, sizes) -> list[str]:
    """What the stage will do on this model (its grid) and what the decoder's prefill becomes."""
    n = int(getattr(sizes, "num_image_tokens", 0) or 0)
    if not n:
        return [f"tokens: pool the image tokens to {opts.count} ({METHODS[opts.method]}) before the projector"]
    g = _geometry(index, opts, n)
    return [f"tokens: {METHODS[opts.method]} of the vision tower's grid before the projector, {g.describe()}",
            f"  every prompt carries {g.tokens_out} image tokens instead of {g.tokens_in} "
            f"({g.tokens_in / g.tokens_out:.1f}× fewer): prefill, KV cache and decoder activations shrink with them"]


def estimate(index: int, opts: TokensOptions, sizes):
    """The sizes after the stage (plans chain): ``num_image_tokens`` becomes ``count``; an impossible
    count for this model's grid is a recipe error here, before any weight loads."""
    n = int(getattr(sizes, "num_image_tokens", 0) or 0)
    if not n:
        return sizes
    try:
        grid_side(n)
    except ValueError:
        raise RecipeError(f"stages[{index}].tokens", [f"the model's {n} image tokens are not a square grid: "
                                                      "nothing to pool"]) from None
    g = _geometry(index, opts, n)
    return dataclasses.replace(sizes, num_image_tokens=g.tokens_out)


SPEC = register_stage(StageSpec(
    STAGE, TokensOptions, "fewer image tokens: the vision tower's grid pooled before the projector",
    "medlite.compress.tokens.stage:run", plan, rules, estimate=estimate,
    caps=Capabilities(changes_weights=True, needs_calibration=True, caches_output=True, changes_image_tokens=True),
    order=Order(phase=15, why="the image tokens are reduced on the (pruned) model before distillation recovers both"),
    numerics=("torch",)))

__all__ = ["TokensOptions", "rules", "plan", "estimate", "achievable_counts", "STAGE", "SPEC"]
