"""slimline: make trained PyTorch models small and fast for deployment.

Python API (mirrors the CLI)::

    import slimline
    result = slimline.run("recipes/quickstart.yaml")      # or a dict
    slimline.validate("recipes/quickstart.yaml")          # raises RecipeError with file:line

The methods live in ``slimline.compress`` (pruning, quantization), ``slimline.search``
(architecture search, distillation) and ``slimline.export`` (ONNX export, latency profiling).
Names are imported on first use, so ``import slimline.export`` stays torch-free on
deployment devices.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from slimline.api import validate
    from slimline.recipe import RecipeError, load_recipe
    from slimline.runner import RunResult, run

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "validate": "slimline.api",
    "RecipeError": "slimline.recipe",
    "load_recipe": "slimline.recipe",
    "RunResult": "slimline.runner",
    "run": "slimline.runner",
}

__all__ = ["RecipeError", "RunResult", "__version__", "load_recipe", "run", "validate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
