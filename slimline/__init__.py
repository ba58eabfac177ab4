"""slimline: make trained PyTorch models small and fast for deployment.

Python API (mirrors the CLI)::

    import slimline
    result = slimline.run("recipes/quickstart.yaml")      # or a dict
    slimline.validate("recipes/quickstart.yaml")          # raises RecipeError with file:line
"""

from __future__ import annotations

__version__ = "0.1.0"

from slimline.api import validate  # noqa: E402
from slimline.recipe import RecipeError, load_recipe  # noqa: E402
from slimline.runner import RunResult, run  # noqa: E402

__all__ = ["RecipeError", "RunResult", "__version__", "load_recipe", "run", "validate"]
