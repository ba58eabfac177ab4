"""How one tensor is quantized: the affine (scale, zero point) grid every quantizer produces.

A :class:`QuantSpec` is plain data — bits, signedness, per-tensor or per-channel axis, scale and
zero point — with the three maps that define it (Jacob et al., 2018, "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", eq. 1; the same formulas as
ONNX ``QuantizeLinear``/``DequantizeLinear``)::

    quantize:    q  = clamp(round(x / scale) + zero_point, qmin, qmax)   (round half to even)
    dequantize:  x^ = (q - zero_point) * scale
    fake_quant:  dequantize(quantize(x))

Every step runs in float32, like ONNX Runtime, so a tensor fake-quantized here and the same
tensor run through QuantizeLinear/DequantizeLinear agree bit for bit. RTN, DFQ/UDFC and the
LSQ/StatsQ QAT methods all end in this type; how they choose ``scale`` is their business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["QuantSpec", "affine_spec", "symmetric_spec"]

# Above 2**24 float32 no longer holds every integer, so "round then multiply" would stop being
# exact; only int32 biases get there, and their quantized values stay far below it in practice.
_MAX_BITS = 32


@dataclass(frozen=True, eq=False)
class QuantSpec:
    """Affine quantization parameters of one tensor (see the module docstring for the maps).

    ``axis`` is ``None`` for one scale for the whole tensor, or the channel axis (0 for conv and
    linear weights) with ``scale``/``zero_point`` holding one value per channel. ``narrow``
    (signed only) drops the most negative level, so ``qmin = -qmax`` and the grid is symmetric
    around zero: symmetric int8 weights use [-127, 127]. ``scale`` is float32 and strictly
    positive; ``zero_point`` is int32 and lies in [qmin, qmax].
    """

    bits: int
    signed: bool
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None = None
    narrow: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= _MAX_BITS:
            raise ValueError(f"bits must be in [2, {_MAX_BITS}], got {self.bits}")
        if self.narrow and not self.signed:
            raise ValueError("narrow range applies to signed grids only")
        scale = torch.as_tensor(self.scale, dtype=torch.float32).detach().cpu()
        zero_point = torch.as_tensor(self.zero_point).detach().cpu().round().to(torch.int32)
        if self.axis is None and scale.numel() != 1:
            raise ValueError(f"per-tensor spec needs one scale, got {scale.numel()}")
        scale = scale.reshape(()) if self.axis is None else scale.reshape(-1)
        zero_point = (
            zero_point.reshape(scale.shape)
            if zero_point.numel() == scale.numel()
            else (zero_point.reshape(()).expand(scale.shape).clone())
        )
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("scale must be finite and > 0 everywhere")
        if bool((zero_point < self.qmin).any()) or bool((zero_point > self.qmax).any()):
            raise ValueError(f"zero point outside [{self.qmin}, {self.qmax}]")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    # ---- the grid ---------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest integer level: ``-2**(bits-1)`` (+1 when narrow) signed, 0 unsigned."""
        return -(2 ** (self.bits - 1)) + int(self.narrow) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer level: ``2**(bits-1) - 1`` signed, ``2**bits - 1`` unsigned."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        """Number of distinct values a quantized tensor can take."""
        return self.qmax - self.qmin + 1

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def storage(self) -> str:
        """Smallest standard integer type that holds the grid (what an exported file stores)."""
        if self.bits <= 8:
            return "int8" if self.signed else "uint8"
        if self.bits <= 16:
            return "int16" if self.signed else "uint16"
        return "int32"

    def _view(self, tensor: torch.Tensor, ndim: int) -> torch.Tensor:
        """``tensor`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional input."""
        if self.axis is None:
            return tensor
        axis = self.axis % ndim
        return tensor.reshape([-1 if d == axis else 1 for d in range(ndim)])

    # ---- the three maps ---------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int32."""
        return _quantize_float(x, self).to(torch.int32)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """``(q - zero_point) * scale`` in float32."""
        q = q.to(torch.float32)
        scale = self._view(self.scale.to(q.device), q.ndim)
        zero_point = self._view(self.zero_point.to(q.device, torch.float32), q.ndim)
        return (q - zero_point) * scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(x))``, differentiable with the clipped straight-through
        estimator (Bengio et al., 2013): the gradient passes where ``x`` is inside the grid."""
        return _FakeQuantSTE.apply(x, self)

    def on_grid(self, x: torch.Tensor) -> bool:
        """Whether ``fake_quant(x) == x`` exactly (e.g. weights baked by a quantizer)."""
        with torch.no_grad():
            return bool(torch.equal(self.fake_quant(x), x.to(torch.float32)))

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict. float32 scales become Python floats, which hold them exactly."""
        scale: Any = self.scale.tolist()
        zero_point: Any = self.zero_point.tolist()
        return {
            "bits": self.bits,
            "signed": self.signed,
            "narrow": self.narrow,
            "axis": self.axis,
            "scale": scale,
            "zero_point": zero_point,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict` (plain data only; unknown keys are an error)."""
        known = {"bits", "signed", "narrow", "axis", "scale", "zero_point"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown quantization spec keys {sorted(unknown)}")
        return cls(
            bits=int(data["bits"]),
            signed=bool(data["signed"]),
            narrow=bool(data.get("narrow", False)),
            axis=data.get("axis"),
            scale=torch.tensor(data["scale"], dtype=torch.float32),
            zero_point=torch.tensor(data["zero_point"], dtype=torch.int64),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantSpec):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        kind = (
            f"per-channel(axis={self.axis}, {self.scale.numel()})"
            if self.per_channel
            else (f"per-tensor(scale={self.scale.item():.6g}, zp={self.zero_point.item()})")
        )
        sign = "signed" if self.signed else "unsigned"
        return f"QuantSpec({self.bits}-bit {sign}{' narrow' if self.narrow else ''}, {kind})"


def _quantize_float(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The quantize map with the integer levels kept in float32 (exact below 2**24)."""
    x = x.to(torch.float32)
    scale = spec._view(spec.scale.to(x.device), x.ndim)
    zero_point = spec._view(spec.zero_point.to(x.device, torch.float32), x.ndim)
    return torch.clamp(torch.round(x / scale) + zero_point, spec.qmin, spec.qmax)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:  # type: ignore[override]
        scale = spec._view(spec.scale.to(x.device), x.ndim)
        zero_point = spec._view(spec.zero_point.to(x.device, torch.float32), x.ndim)
        unclamped = torch.round(x.to(torch.float32) / scale) + zero_point
        ctx.save_for_backward((unclamped >= spec.qmin) & (unclamped <= spec.qmax))
        q = torch.clamp(unclamped, spec.qmin, spec.qmax)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None


# ---- constructors (the usual ways of choosing the grid) ------------------------------------


def symmetric_spec(
    max_abs: torch.Tensor | float, bits: int, *, axis: int | None = None, narrow: bool = True
) -> QuantSpec:
    """Signed grid centred on zero: ``scale = max|x| / qmax``, ``zero_point = 0``.

    Zero is exactly representable, so pruned (zero) weights stay zero. A channel whose max is 0
    (all pruned) gets scale 1: any positive scale maps it to level 0.
    """
    max_abs = torch.as_tensor(max_abs, dtype=torch.float32).detach().cpu()
    qmax = 2 ** (bits - 1) - 1
    scale = torch.where(max_abs > 0, max_abs / qmax, torch.ones_like(max_abs))
    return QuantSpec(
        bits=bits,
        signed=True,
        narrow=narrow,
        axis=axis,
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int32),
    )


def affine_spec(
    minimum: float, maximum: float, bits: int, *, signed: bool = False, symmetric: bool = False
) -> QuantSpec:
    """Per-tensor grid covering ``[min(minimum, 0), max(maximum, 0)]`` (zero exactly
    representable, which ReLU outputs and zero padding need).

    Asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min /
    scale)`` (Jacob et al., 2018, sec. 2.1). Symmetric: ``scale = max(|min|, |max|) / ((qmax -
    qmin) / 2)`` with the zero point in the middle of the grid (0 signed, 2**(bits-1) unsigned).
    """
    if not (math.isfinite(minimum) and math.isfinite(maximum)):
        raise ValueError(f"observed range [{minimum}, {maximum}] is not finite")
    low, high = min(float(minimum), 0.0), max(float(maximum), 0.0)
    qmin = -(2 ** (bits - 1)) if signed else 0
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    if symmetric:
        half = (qmax - qmin) / 2
        scale = torch.tensor(max(-low, high) / half, dtype=torch.float32)
        zero_point = 0 if signed else 2 ** (bits - 1)
    else:
        scale = torch.tensor((high - low) / (qmax - qmin), dtype=torch.float32)
        zero_point = 0
        if scale > 0:
            zero_point = int(min(max(qmin - round(low / float(scale)), qmin), qmax))
    if not scale > 0:  # a tensor that was always exactly zero
        scale = torch.tensor(1.0)
        zero_point = 0 if signed else qmin
    return QuantSpec(bits=bits, signed=signed, scale=scale, zero_point=zero_point)
