"""A quantized model's state: which tensors are quantized how, and how a module runs it.

:class:`QuantState` holds one :class:`~slimline.compress.quant.spec.QuantSpec` per quantized parameter
(by parameter name: ``"layer1.0.conv1.weight"``, int32 biases as ``"...conv1.bias"``) and per
quantized activation (by :class:`TensorPoint`: the input or the output of a named module). It is
what every quantizer in :mod:`slimline.compress.quant` returns, what an Artifact stores (JSON-able, in
``artifact.state["quantization"]``) and what the int8 QDQ exporter reads.

:func:`attach_quantization` makes a module's PyTorch forward run the quantized computation:

* parameters are replaced by their fake-quantized values ("baked" onto the grid; idempotent), so
  the state_dict keeps its keys and shapes and a checkpoint reloads into the plain architecture;
* activations are fake-quantized by forward (pre-)hooks that hold their spec. The hooks are
  plain objects (no closures), so ``copy.deepcopy(model)`` copies them with the model; they add
  no parameters, buffers or submodules, so saving, parameter counts and structure records are
  unaffected. ``Artifact.load`` calls :func:`attach_quantization` again from the stored dict.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.nn as nn

from slimline.compress.quant.spec import QuantSpec

__all__ = [
    "QuantState",
    "QuantStateError",
    "TensorPoint",
    "attach_quantization",
    "detach_quantization",
    "off_grid_parameters",
    "quantization_of",
    "tracing_as_qdq",
]

STATE_VERSION = 1
_MODEL_ATTR = "_slimline_quantization"  # leading "_": invisible to structure records
_QDQ_TRACE: contextvars.ContextVar[bool] = contextvars.ContextVar("qdq_trace", default=False)


class QuantStateError(ValueError):
    """A quantization state that does not fit the model (names the parameter or module)."""


@dataclass(frozen=True)
class TensorPoint:
    """Where an activation is quantized: the first input or the output of module ``module``.

    An ``output`` point changes what *every* consumer of that module's output sees (a residual
    add included); an ``input`` point changes only what that one module sees. The key is
    ``"<module>:input"`` / ``"<module>:output"`` (``module`` may be ``""``, the model itself).
    """

    module: str
    where: Literal["input", "output"]

    def __post_init__(self) -> None:
        if self.where not in ("input", "output"):
            raise ValueError(f"tensor point must be 'input' or 'output', got {self.where!r}")

    @property
    def key(self) -> str:
        return f"{self.module}:{self.where}"

    @classmethod
    def parse(cls, key: str) -> TensorPoint:
        module, sep, where = key.rpartition(":")
        if not sep or where not in ("input", "output"):
            raise ValueError(f"tensor point key {key!r} is not '<module>:input|output'")
        return cls(module, where)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.where} of {self.module or 'the model'!r}"


@dataclass
class QuantState:
    """Quantization of a whole model: parameter specs by name, activation specs by point key.

    ``method`` names the quantizer ("rtn", "dfq", "lsq", ...); ``info`` holds JSON-able extras it
    wants to record (bit widths, calibration size, notes).
    """

    weights: dict[str, QuantSpec] = field(default_factory=dict)
    activations: dict[str, QuantSpec] = field(default_factory=dict)
    method: str = "unknown"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in self.activations:
            TensorPoint.parse(key)  # fail early on a malformed key

    def points(self) -> list[TensorPoint]:
        return [TensorPoint.parse(key) for key in self.activations]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``artifact.state["quantization"]`` holds)."""
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "info": dict(self.info),
            "weights": {name: spec.to_dict() for name, spec in self.weights.items()},
            "activations": {key: spec.to_dict() for key, spec in self.activations.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantState:
        """Inverse of :meth:`to_dict`; builds only specs and plain data (no code from files)."""
        if data.get("version") != STATE_VERSION:
            raise QuantStateError(
                f"quantization state version {data.get('version')!r} is not "
                f"{STATE_VERSION}; re-run the quantization stage"
            )
        return cls(
            weights={k: QuantSpec.from_dict(v) for k, v in data["weights"].items()},
            activations={k: QuantSpec.from_dict(v) for k, v in data["activations"].items()},
            method=str(data.get("method", "unknown")),
            info=dict(data.get("info", {})),
        )


# ---- running the quantized forward ----------------------------------------------------------


class _ActivationFakeQuant:
    """Forward (pre-)hook that fake-quantizes a module's first input or its output.

    In QDQ-trace mode (see :func:`tracing_as_qdq`) it emits torch's ``quantized_decomposed``
    quantize/dequantize ops instead, which the ONNX exporter turns into QuantizeLinear and
    DequantizeLinear nodes with this spec's scale and zero point.
    """

    def __init__(self, spec: QuantSpec, point: TensorPoint):
        if spec.per_channel or spec.bits > 16:
            raise QuantStateError(
                f"activation spec at {point} must be per-tensor, at most 16-bit, got {spec}"
            )
        self.spec, self.point = spec, point

    def quantize(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise QuantStateError(
                f"cannot quantize the {self.point}: it is {type(x).__name__}, not a float tensor"
            )
        if _QDQ_TRACE.get():
            return _qdq_ops(x, self.spec)
        return self.spec.fake_quant(x)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], *output: Any) -> Any:
        if self.point.where == "input":
            return (self.quantize(args[0]), *args[1:])
        return self.quantize(output[0])


def _qdq_ops(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # The ops must be registered before the exporter builds its op table (import at the top).
    ops = torch.ops.quantized_decomposed
    dtype = torch.int8 if spec.signed else torch.uint8
    scale, zero_point = float(spec.scale), int(spec.zero_point)  # float32 -> float64: exact
    q = ops.quantize_per_tensor(x, scale, zero_point, spec.qmin, spec.qmax, dtype)
    return ops.dequantize_per_tensor(q, scale, zero_point, spec.qmin, spec.qmax, dtype)


@contextlib.contextmanager
def tracing_as_qdq() -> Iterator[None]:
    """Within this block attached activation hooks emit quantize/dequantize ops (for export)."""
    token = _QDQ_TRACE.set(True)
    try:
        yield
    finally:
        _QDQ_TRACE.reset(token)


def _hooks(model: nn.Module) -> Iterator[tuple[nn.Module, dict[int, Any], int]]:
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for handle_id, hook in list(hooks.items()):
                if isinstance(hook, _ActivationFakeQuant):
                    yield module, hooks, handle_id


def detach_quantization(model: nn.Module) -> QuantState | None:
    """Remove the activation hooks and the state; returns the state. Weights stay baked."""
    for _module, hooks, handle_id in list(_hooks(model)):
        del hooks[handle_id]
    return model.__dict__.pop(_MODEL_ATTR, None)


def quantization_of(model: nn.Module) -> QuantState | None:
    """The state attached to ``model`` (survives ``copy.deepcopy``), or ``None``."""
    return model.__dict__.get(_MODEL_ATTR)


@torch.no_grad()
def attach_quantization(model: nn.Module, state: QuantState | dict[str, Any]) -> nn.Module:
    """Make ``model``'s forward run ``state``'s fake quantization (in place; returns ``model``).

    Parameters named in ``state.weights`` are set to their fake-quantized values, and each
    activation point gets a hook. Attaching again replaces the previous hooks.

    Raises:
        QuantStateError: a parameter or module named by the state is not in the model, or a
            spec's channel count does not match its parameter.
    """
    if isinstance(state, dict):
        state = QuantState.from_dict(state)
    parameters = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name, spec in state.weights.items():
        if name not in parameters:
            raise QuantStateError(f"quantized parameter {name!r} is not in {type(model).__name__}")
        tensor = parameters[name]
        if spec.per_channel and spec.scale.numel() != tensor.shape[spec.axis]:
            raise QuantStateError(
                f"{name}: {spec.scale.numel()} scales for "
                f"{tensor.shape[spec.axis]} channels on axis {spec.axis}"
            )
    points = state.points()
    for point in points:
        if point.module not in modules:
            raise QuantStateError(
                f"quantized activation point {point} names no module of {type(model).__name__}"
            )
    detach_quantization(model)
    for name, spec in state.weights.items():
        parameters[name].copy_(spec.fake_quant(parameters[name]))
    for point, spec in zip(points, state.activations.values()):
        hook = _ActivationFakeQuant(spec, point)
        module = modules[point.module]
        if point.where == "input":
            module.register_forward_pre_hook(hook)
        else:
            module.register_forward_hook(hook)
    model.__dict__[_MODEL_ATTR] = state
    return model


def off_grid_parameters(model: nn.Module, state: QuantState) -> list[str]:
    """Names of quantized parameters whose values are no longer on their grid (e.g. a model
    fine-tuned after quantization without re-attaching)."""
    parameters = dict(model.named_parameters())
    return [
        name
        for name, spec in state.weights.items()
        if name in parameters and not spec.on_grid(parameters[name].detach())
    ]
