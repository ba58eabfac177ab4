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
    wants to record (bit widths, calibration size, notes). ``smoothing`` maps a Linear's input
    point to per-channel divisors ``s`` (SmoothQuant, :mod:`slimline.compress.quant.smoothing`):
    the input is divided by ``s`` before it is quantized, and the layer's stored weight already
    holds ``W diag(s)``.
    """

    weights: dict[str, QuantSpec] = field(default_factory=dict)
    activations: dict[str, QuantSpec] = field(default_factory=dict)
    method: str = "unknown"
    info: dict[str, Any] = field(default_factory=dict)
    smoothing: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in [*self.activations, *self.smoothing]:
            TensorPoint.parse(key)  # fail early on a malformed key
        for key in self.smoothing:
            if TensorPoint.parse(key).where != "input":
                raise QuantStateError(f"smoothing applies to a layer's input, not {key!r}")

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
            "smoothing": {key: s.tolist() for key, s in self.smoothing.items()},
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
            smoothing={k: torch.tensor(v, dtype=torch.float32)
                       for k, v in data.get("smoothing", {}).items()},
        )


# ---- running the quantized forward ----------------------------------------------------------


class _ActivationFakeQuant:
    """Forward (pre-)hook that fake-quantizes a module's first input or its output.

    In QDQ-trace mode (see :func:`tracing_as_qdq`) it emits torch's ``quantized_decomposed``
    quantize/dequantize ops instead, which the ONNX exporter turns into QuantizeLinear and
    DequantizeLinear nodes with this spec's scale and zero point.

    With a smoothing divisor (input points only) it first multiplies the input by ``1/s``
    along its last axis (a Mul in the exported graph); with no spec it only does that (the
    quantizer observing the smoothed input before it has chosen the spec).
    """

    def __init__(self, spec: QuantSpec | None, point: TensorPoint,
                 inverse: torch.Tensor | None = None):
        if spec is not None and (spec.per_channel or spec.bits > 16):
            raise QuantStateError(
                f"activation spec at {point} must be per-tensor, at most 16-bit, got {spec}"
            )
        self.spec, self.point, self.inverse = spec, point, inverse

    def quantize(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise QuantStateError(
                f"cannot quantize the {self.point}: it is {type(x).__name__}, not a float tensor"
            )
        if self.inverse is not None:
            if x.shape[-1] != self.inverse.numel():
                raise QuantStateError(
                    f"the {self.point} has {x.shape[-1]} channels in its last axis, its "
                    f"smoothing {self.inverse.numel()}"
                )
            x = x * self.inverse.to(x.device, x.dtype)  # no-op on CPU float32 (and in a trace)
        if self.spec is None:
            return x
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
    """Remove the activation hooks and the state; returns the state. Weights stay baked, except
    that smoothed layers' weight columns are divided by their ``s`` again (without the hooks'
    division of the input the model would compute something else). To attach the state again,
    pass ``scale_weights=True`` to :func:`attach_quantization`."""
    state = quantization_of(model)
    _detach_hooks(model)
    if state is not None and state.smoothing:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for key, divisor in state.smoothing.items():
                weight = modules[TensorPoint.parse(key).module].weight
                weight.div_(divisor.to(weight.device, weight.dtype))
    return state


def quantization_of(model: nn.Module) -> QuantState | None:
    """The state attached to ``model`` (survives ``copy.deepcopy``), or ``None``."""
    return model.__dict__.get(_MODEL_ATTR)


@torch.no_grad()
def attach_quantization(model: nn.Module, state: QuantState | dict[str, Any], *,
                        scale_weights: bool = False) -> nn.Module:
    """Make ``model``'s forward run ``state``'s fake quantization (in place; returns ``model``).

    Parameters named in ``state.weights`` are set to their fake-quantized values, and each
    activation point gets a hook. Attaching again replaces the previous hooks. Smoothed
    layers' weights are taken to hold ``W diag(s)`` already, as a quantizer or an Artifact
    leaves them; ``scale_weights=True`` multiplies them by ``s`` first, for a float model (one
    :func:`detach_quantization` returned, or the model the state was computed from).

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
    _check_smoothing(state, modules, type(model).__name__)
    _detach_hooks(model)  # not detach_quantization: the weights already hold W diag(s)
    if scale_weights:
        for key, divisor in state.smoothing.items():
            weight = modules[TensorPoint.parse(key).module].weight
            weight.mul_(divisor.to(weight.device, weight.dtype))
    for name, spec in state.weights.items():
        parameters[name].copy_(spec.fake_quant(parameters[name]))
    specs: dict[str, QuantSpec | None] = dict(state.activations)
    specs.update({key: None for key in state.smoothing if key not in specs})
    inverses: dict[bytes, torch.Tensor] = {}  # one tensor per distinct divisor: layers that
    # share an input and its smoothing export one Mul constant, which onnxruntime's common
    # subexpression elimination then computes (and quantizes) once for all of them
    for key, spec in specs.items():
        point = TensorPoint.parse(key)
        divisor = state.smoothing.get(key)
        inverse = None
        if divisor is not None:
            divisor = divisor.detach().float().cpu().contiguous()
            inverse = inverses.setdefault(divisor.numpy().tobytes(), 1.0 / divisor)
        hook = _ActivationFakeQuant(spec, point, inverse)
        module = modules[point.module]
        if point.where == "input":
            module.register_forward_pre_hook(hook)
        else:
            module.register_forward_hook(hook)
    model.__dict__[_MODEL_ATTR] = state
    return model


def _detach_hooks(model: nn.Module) -> None:
    for _module, hooks, handle_id in list(_hooks(model)):
        del hooks[handle_id]
    model.__dict__.pop(_MODEL_ATTR, None)


def _check_smoothing(state: QuantState, modules: dict[str, nn.Module], model: str) -> None:
    for key, divisor in state.smoothing.items():
        name = TensorPoint.parse(key).module
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise QuantStateError(f"smoothing at {key!r}: {name!r} is no Linear of {model}")
        if divisor.numel() != module.in_features:
            raise QuantStateError(f"smoothing at {key!r}: {divisor.numel()} divisors for "
                                  f"{module.in_features} input features")


def off_grid_parameters(model: nn.Module, state: QuantState) -> list[str]:
    """Names of quantized parameters whose values are no longer on their grid (e.g. a model
    fine-tuned after quantization without re-attaching)."""
    parameters = dict(model.named_parameters())
    return [
        name
        for name, spec in state.weights.items()
        if name in parameters and not spec.on_grid(parameters[name].detach())
    ]
