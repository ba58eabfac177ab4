"""One call per family: :func:`prune` and :func:`quantize` run the method registered for the
type of the config they are given (torchao's pattern: a config dataclass, a handler per type).

Each config is the same dataclass a recipe stage uses as its schema (``prune.unstructured``
takes :class:`~slimline.compress.prune.unstructured.UnstructuredConfig`, and so on), so the
Python API and recipes cannot drift. Every method works on a plain ``nn.Module`` in place and
returns what it did::

    from slimline import prune, quantize, UnstructuredConfig, RTNConfig
    pruned = prune(model, UnstructuredConfig(sparsity=0.5, allocation="dp"))   # data-free
    quantized = quantize(model, RTNConfig(), data=dataset, target="auto")
    pruned.masks, pruned.metrics["distortion"], quantized.state

A new method is a config dataclass plus a function ``(model, config, MethodInputs) -> result``
decorated with :func:`register_pruner` or :func:`register_quantizer`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
import torch.nn as nn

from slimline.inputs import InputSpec
from slimline.progress import Progress

if TYPE_CHECKING:
    from slimline.compress.quant.state import QuantState
    from slimline.data import Dataset
    from slimline.export.target import Target

__all__ = [
    "MethodConfig",
    "MethodError",
    "MethodInputs",
    "PruneResult",
    "QuantizeResult",
    "prune",
    "quantize",
    "register_pruner",
    "register_quantizer",
]

ProgressFactory = Callable[[int, str], Progress]
DataUse = Literal["none", "optional", "required"]


class MethodError(ValueError):
    """A method cannot run as configured on this model (the message says why and what to do)."""


class MethodConfig:
    """Mixin for method configs: ``data`` says whether the method reads a dataset."""

    data: ClassVar[DataUse] = "none"

    def uses_data(self) -> bool:
        """Whether this configuration reads the dataset (data-free methods never do)."""
        return self.data == "required"


def no_progress(total: int, desc: str) -> Progress:
    return Progress(total, desc, enabled=False)


@dataclass
class MethodInputs:
    """What a method may use besides the model. ``masks`` are keep-masks from earlier pruning
    (kept pruned); ``example_input`` is one batch of the model's input for tracing."""

    data: Dataset | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    example_input: torch.Tensor | None = None
    target: Target | str | None = "auto"
    seed: int = 0
    progress: ProgressFactory = no_progress
    teacher: nn.Module | None = None
    input_spec: InputSpec | None = None  # default: float inputs shaped like example_input

    def synthetic(self, samples: int, method: str) -> torch.Tensor:
        """``samples`` data-free inputs: valid token ids or N(0, 1) features (see
        :class:`slimline.inputs.InputSpec`), from ``seed``."""
        spec = self.input_spec or InputSpec.of(self.require_example(method))
        return spec.random(samples, seed=self.seed)

    def require_data(self, method: str) -> Dataset:
        if self.data is None:
            raise MethodError(f"{method} trains or calibrates on data: pass data=<Dataset>")
        return self.data

    def require_example(self, method: str) -> torch.Tensor:
        if self.example_input is None:
            raise MethodError(f"{method} traces the model: pass example_input=<one batch>")
        return self.example_input


@dataclass
class PruneResult:
    """What a pruner did. ``masks`` are all keep-masks now in force (earlier ones composed);
    ``record`` is the JSON-able description (an artifact's ``state["pruning"]``);
    ``extras`` holds data worth keeping beside it (e.g. the DP's distortion curves)."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    record: dict[str, Any]
    metrics: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizeResult:
    """What a quantizer did; the state is also attached to ``model``. Joint methods (UDFC)
    also prune: ``pruning`` is then their record and ``masks`` the sliced keep-masks."""

    model: nn.Module
    state: QuantState
    metrics: dict[str, Any]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


ConfigT = TypeVar("ConfigT")
Handler = Callable[[nn.Module, Any, MethodInputs], Any]
_PRUNERS: dict[type, Handler] = {}
_QUANTIZERS: dict[type, Handler] = {}
# Modules whose import registers the built-in methods (kept lazy: importing torch-pruning,
# numba and onnxscript costs seconds and most calls need one method).
_BUILTIN = (
    "slimline.compress.prune.magnitude",
    "slimline.compress.prune.nm",
    "slimline.compress.prune.unstructured",
    "slimline.compress.prune.channels",
    "slimline.compress.prune.sites",
    "slimline.compress.prune.pdp",
    "slimline.compress.quant.rtn",
    "slimline.compress.quant.datafree",
    "slimline.compress.quant.udfc",
    "slimline.compress.quant.qat.training",
)


def register_pruner(config_type: type) -> Callable[[Handler], Handler]:
    def add(handler: Handler) -> Handler:
        _PRUNERS[config_type] = handler
        return handler

    return add


def register_quantizer(config_type: type) -> Callable[[Handler], Handler]:
    def add(handler: Handler) -> Handler:
        _QUANTIZERS[config_type] = handler
        return handler

    return add


def _handler(table: dict[type, Handler], config: Any, family: str) -> Handler:
    if type(config) not in table:
        for module in _BUILTIN:
            importlib.import_module(module)
    found = table.get(type(config))
    if found is None:
        known = ", ".join(sorted(t.__name__ for t in table))
        raise TypeError(f"{type(config).__name__} is not a {family} config (known: {known})")
    return found


def prune(
    model: nn.Module,
    config: Any,
    *,
    data: Dataset | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    example_input: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: ProgressFactory | None = None,
    input_spec: InputSpec | None = None,
) -> PruneResult:
    """Prune ``model`` in place with the method ``config`` configures (see the module docs).

    Data-free methods never read ``data``; train-time ones (PDP) need it. ``masks`` from an
    earlier pruning stay pruned and are composed with the new ones.
    """
    inputs = MethodInputs(data=data, masks=dict(masks or {}), example_input=example_input,
                          seed=seed, progress=progress or no_progress, teacher=teacher,
                          input_spec=input_spec)
    return _handler(_PRUNERS, config, "pruning")(model, config, inputs)


def quantize(
    model: nn.Module,
    config: Any,
    *,
    data: Dataset | None = None,
    target: Target | str | None = "auto",
    masks: dict[str, torch.Tensor] | None = None,
    example_input: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: ProgressFactory | None = None,
    input_spec: InputSpec | None = None,
) -> QuantizeResult:
    """Quantize ``model`` in place for the CPU ``target`` (``"auto"``: this one; see
    :mod:`slimline.export.target`) with the method ``config`` configures."""
    inputs = MethodInputs(data=data, masks=dict(masks or {}), example_input=example_input,
                          target=target, seed=seed, progress=progress or no_progress,
                          teacher=teacher, input_spec=input_spec)
    return _handler(_QUANTIZERS, config, "quantization")(model, config, inputs)


def compose_masks(
    earlier: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Earlier keep-masks AND new ones: pruning composes instead of undoing what came before."""
    out = dict(earlier)
    for name, mask in new.items():
        out[name] = mask & out[name] if name in out else mask
    return out
