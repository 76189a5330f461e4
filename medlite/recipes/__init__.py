"""Recipes: typed YAML descriptions of a build (stages, target, data sets, gates).

Public API::

    from medlite.recipes import load_recipe, ResolvedRecipe, Recipe
    resolved = load_recipe("recipes/xavier-agx-fp16.yaml", ["export.precision=fp32"])

Loading validates the whole recipe before any weight is touched and raises
:class:`medlite.errors.RecipeError` with every problem and its YAML path.
"""
from medlite.recipes.loader import (ResolvedRecipe, apply_overrides, builtin_recipes, format_path,
                                    load_recipe, parse_path, resolve_recipe_path, validate_data)
from medlite.recipes.registry import STAGES, Capabilities, Order, StageSpec, register_stage, stage
from medlite.recipes.schema import Recipe, entry_model

__all__ = ["Capabilities", "Order", "Recipe", "ResolvedRecipe", "entry_model", "STAGES", "StageSpec", "apply_overrides",
           "builtin_recipes", "format_path", "load_recipe", "parse_path", "resolve_recipe_path",
           "validate_data", "register_stage", "stage"]
