"""slimline: make trained PyTorch models small and fast for deployment.

Python API (mirrors the CLI; see :mod:`slimline.api`)::

    import slimline
    result = slimline.run("recipes/quickstart.yaml")      # or a dict
    slimline.validate("recipes/quickstart.yaml")          # raises RecipeError with file:line
    slimline.prune(model, slimline.UnstructuredConfig(sparsity=0.5), data=data)
    slimline.quantize(model, slimline.RTNConfig(), data=data, target="auto")
    slimline.export_model(model, example, "model.onnx", slimline.ExportConfig(format="int8"))
    found = slimline.nas(teacher, data, slimline.NasConfig(max_params=20_000))

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
    from slimline.api import distill, export_model, nas, prune, quantize, train, validate
    from slimline.compress.deploy import ExportConfig
    from slimline.compress.prune.channels import ChannelConfig
    from slimline.compress.prune.magnitude import MagnitudeConfig
    from slimline.compress.prune.nm import NMConfig
    from slimline.compress.prune.pdp import PDPConfig
    from slimline.compress.prune.sites import NeuronMergingConfig, PlainChannelsConfig
    from slimline.compress.prune.unstructured import UnstructuredConfig
    from slimline.compress.quant.datafree import DataFreeConfig, DFQConfig
    from slimline.compress.quant.qat.config import QATConfig
    from slimline.compress.quant.rtn import RTNConfig
    from slimline.compress.quant.udfc import UDFCConfig
    from slimline.export.ort_quant import OrtQuantizeConfig
    from slimline.recipe import RecipeError, load_recipe
    from slimline.runner import RunResult, run
    from slimline.search.distill import DistillConfig
    from slimline.search.nas_config import NasConfig
    from slimline.training import TrainParams

# public name -> module that defines it (imported on first attribute access; __all__ below
# lists the same names)
_LAZY = {
    **dict.fromkeys(("validate", "prune", "quantize", "export_model", "nas", "distill", "train"),
                    "slimline.api"),
    "RecipeError": "slimline.recipe",
    "load_recipe": "slimline.recipe",
    "RunResult": "slimline.runner",
    "run": "slimline.runner",
    # the configs: the same dataclasses the recipe stages take as their schema
    "MagnitudeConfig": "slimline.compress.prune.magnitude",
    "UnstructuredConfig": "slimline.compress.prune.unstructured",
    "ChannelConfig": "slimline.compress.prune.channels",
    "NMConfig": "slimline.compress.prune.nm",
    "PlainChannelsConfig": "slimline.compress.prune.sites",
    "NeuronMergingConfig": "slimline.compress.prune.sites",
    "PDPConfig": "slimline.compress.prune.pdp",
    "RTNConfig": "slimline.compress.quant.rtn",
    "DataFreeConfig": "slimline.compress.quant.datafree",
    "DFQConfig": "slimline.compress.quant.datafree",
    "UDFCConfig": "slimline.compress.quant.udfc",
    "QATConfig": "slimline.compress.quant.qat.config",
    "ExportConfig": "slimline.compress.deploy",
    "OrtQuantizeConfig": "slimline.export.ort_quant",
    "DistillConfig": "slimline.search.distill",
    "NasConfig": "slimline.search.nas_config",
    "TrainParams": "slimline.training",
}

__all__ = [
    "__version__",
    "ChannelConfig",
    "DFQConfig",
    "DataFreeConfig",
    "DistillConfig",
    "ExportConfig",
    "MagnitudeConfig",
    "NMConfig",
    "NasConfig",
    "NeuronMergingConfig",
    "OrtQuantizeConfig",
    "PDPConfig",
    "PlainChannelsConfig",
    "QATConfig",
    "RTNConfig",
    "RecipeError",
    "RunResult",
    "TrainParams",
    "UDFCConfig",
    "UnstructuredConfig",
    "distill",
    "export_model",
    "load_recipe",
    "nas",
    "prune",
    "quantize",
    "run",
    "train",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
