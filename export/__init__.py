"""ONNX export, graph inspection and latency profiling.

``graph`` and ``latency`` need only onnx/onnxruntime/numpy, so they are imported eagerly; the
torch-based exporter (``export_onnx``, ``check_parity``, ...) is imported on first use, keeping
``import export`` torch-free on deployment hosts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .graph import GraphSummary, OnnxFileError, TensorInfo, graph_summary, load_model
from .latency import BatchLatency, LatencyReport, compare_table, machine_info, profile_onnx
from .profile_cli import add_profile_arguments, main_profile

if TYPE_CHECKING:
    from .export_errors import ExportError
    from .onnx_export import export_onnx
    from .parity import ParityError, ParityResult, assert_parity, check_parity

# name -> torch-based module that defines it, imported on first use
_LAZY = {
    "ExportError": ".export_errors",
    "export_onnx": ".onnx_export",
    "ParityError": ".parity",
    "ParityResult": ".parity",
    "assert_parity": ".parity",
    "check_parity": ".parity",
}

__all__ = [
    "BatchLatency",
    "ExportError",
    "GraphSummary",
    "LatencyReport",
    "OnnxFileError",
    "ParityError",
    "ParityResult",
    "TensorInfo",
    "add_profile_arguments",
    "assert_parity",
    "check_parity",
    "compare_table",
    "export_onnx",
    "graph_summary",
    "load_model",
    "machine_info",
    "main_profile",
    "profile_onnx",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
