"""Library versions recorded with every run, benchmark and fixture (reproducibility)."""

from __future__ import annotations

import contextlib
import platform
import sys

from slimline import __version__

__all__ = ["versions"]


def versions() -> dict[str, str]:
    """slimline, Python, the platform and the numeric libraries that decide results."""
    found = {"slimline": __version__, "python": sys.version.split()[0],
             "platform": platform.platform()}
    for module in ("torch", "numpy", "onnx", "onnxruntime", "optuna", "numba"):
        with contextlib.suppress(Exception):
            found[module] = __import__(module).__version__
    return found
