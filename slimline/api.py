"""Small helpers of the public Python API that are not the runner itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimline.dag import Plan, build_plan
from slimline.recipe import Recipe, load_recipe


def validate(recipe: str | Path | dict[str, Any] | Recipe) -> Plan:
    """Parse and validate a recipe without running anything; returns the ordered plan.

    Raises :class:`slimline.RecipeError` naming the file, line and key of the first problem.
    """
    return build_plan(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))
