"""Which CPU an int8 model is for, and the int8 scheme that CPU's onnxruntime kernels compute
exactly (torch-free).

Why this matters: onnxruntime's x86 u8s8 GEMM kernels (MLAS, used by QLinearConv, QGemm,
MatMulInteger) differ by instruction set. With AVX-512 VNNI, AVX-VNNI or AMX the products
``uint8 activation x int8 weight`` are summed straight into int32 (``VPDPBUSD``), which is exact.
Without them (AVX2, and AVX-512 without VNNI) the kernels use ``VPMADDUBSW``, which adds *pairs*
of products into a saturating int16 first: ``255 * 127 * 2 = 64770`` overflows ``32767``, so a
model with full-range int8 weights is computed *wrongly* (measured here: 7-57 % of the largest
logit on small CNNs, ViTs and MLPs). Keeping weight levels within ``+-64`` bounds every pair at
``255 * 64 * 2 = 32640``: exact. That is onnxruntime's ``reduce_range`` (7-bit weights).
Depthwise convolutions run a separate kernel that accumulates in int32 and are exact at full
range on every CPU, so they keep 8 bits. Arm64 kernels (NEON widening multiplies, or
``SDOT``/``UDOT`` with the dot-product extension) are exact at full range.

A :class:`Target` names such a CPU class (``x86-avx2``, ``x86-vnni``, ...; ``auto`` resolves this
machine from :func:`~slimline.export.machine.machine_info`); its :class:`Int8Scheme` says what the
quantizers may use: uint8 activations (what x86 kernels fuse) and the largest weight level per
kernel kind. ``portable`` is the scheme that is exact on every target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "FULL_RANGE_LEVEL",
    "SATURATION_SAFE_LEVEL",
    "TARGETS",
    "Int8Scheme",
    "Target",
    "TargetError",
    "WeightKernel",
    "fit_weight_bits",
    "resolve_target",
    "target_for_machine",
]

WeightKernel = Literal["gemm", "depthwise"]

FULL_RANGE_LEVEL = 128  # int8 holds [-128, 127]: no limit
# |level| <= 64 keeps VPMADDUBSW's pair sums inside int16: 255 * 64 * 2 = 32640 <= 32767.
SATURATION_SAFE_LEVEL = 64
_X86_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i686", "x86")
_ARM64 = ("aarch64", "arm64", "armv8l")


class TargetError(ValueError):
    """An unknown target name (the message lists the known ones)."""


@dataclass(frozen=True)
class Int8Scheme:
    """The int8 grids a target's onnxruntime CPU kernels compute exactly.

    ``max_weight_level[kernel]`` bounds ``|q|`` of the stored int8 weight levels of layers run
    by that kernel: ``gemm`` (Conv, grouped Conv, Gemm/Linear, MatMul) or ``depthwise`` (Conv
    with one input and one output channel per group). Activations are 8-bit uint8, per tensor.
    """

    target: str
    activation_dtype: str
    max_weight_level: Mapping[str, int]
    reason: str

    @property
    def reduce_range(self) -> bool:
        """Whether GEMM weights are limited to 7 bits (onnxruntime's ``reduce_range``)."""
        return self.max_weight_level["gemm"] < FULL_RANGE_LEVEL

    def weight_level(self, kernel: WeightKernel) -> int:
        return self.max_weight_level[kernel]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["max_weight_level"] = dict(self.max_weight_level)
        data["reduce_range"] = self.reduce_range
        return data


@dataclass(frozen=True)
class Target:
    """A class of CPUs that share onnxruntime's int8 kernel numerics."""

    name: str
    arch: Literal["x86_64", "arm64", "any"]
    description: str
    saturates_u8s8: bool  # VPMADDUBSW pair sums (no int8 dot-product instructions)

    @property
    def scheme(self) -> Int8Scheme:
        if self.saturates_u8s8:
            gemm = SATURATION_SAFE_LEVEL
            reason = (
                f"{self.description}: onnxruntime's u8s8 kernels add pairs of uint8 x int8 "
                "products in saturating int16 (VPMADDUBSW), so Conv/Gemm/MatMul weights keep "
                f"|level| <= {SATURATION_SAFE_LEVEL} (7-bit, onnxruntime's reduce_range) to be "
                "computed exactly; depthwise convs accumulate in int32 and keep 8 bits"
            )
        else:
            gemm = FULL_RANGE_LEVEL
            reason = (
                f"{self.description}: onnxruntime's int8 kernels accumulate every product in "
                "int32, so full-range 8-bit weights are computed exactly"
            )
        return Int8Scheme(
            target=self.name,
            activation_dtype="uint8",
            max_weight_level={"gemm": gemm, "depthwise": FULL_RANGE_LEVEL},
            reason=reason,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scheme": self.scheme.to_dict()}

    def __str__(self) -> str:
        return self.name


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("x86-avx2", "x86_64", "x86-64 with AVX2, no int8 dot product (no VNNI)", True),
        Target("x86-avx512", "x86_64", "x86-64 with AVX-512 but no VNNI (e.g. Skylake-SP)", True),
        Target("x86-vnni", "x86_64", "x86-64 with AVX-512 VNNI or AVX-VNNI", False),
        Target("x86-amx", "x86_64", "x86-64 with AMX-INT8 (and VNNI)", False),
        Target("arm64-dot", "arm64", "Arm64 with the dot-product extension (SDOT/UDOT)", False),
        Target("arm64", "arm64", "Arm64 NEON without the dot-product extension", False),
        Target("portable", "any", "any CPU (the scheme exact on every target)", True),
    )
}


def target_for_machine(machine: Mapping[str, Any]) -> Target:
    """The target of the CPU described by ``machine`` (:func:`slimline.export.machine.machine_info`:
    ``arch`` and ``isa_flags``). An unknown architecture, or x86 without AVX2, gets ``portable``."""
    flags = set(machine.get("isa_flags") or ())
    arch = str(machine.get("arch", "")).lower()
    if arch in _X86:
        if "amx_int8" in flags:
            return TARGETS["x86-amx"]
        if flags & set(_X86_DOT):
            return TARGETS["x86-vnni"]
        if "avx512f" in flags:
            return TARGETS["x86-avx512"]
        if "avx2" in flags:
            return TARGETS["x86-avx2"]
    elif arch in _ARM64:
        return TARGETS["arm64-dot" if "asimddp" in flags else "arm64"]
    return TARGETS["portable"]


def resolve_target(target: str | Target | None = "auto") -> Target:
    """A :class:`Target` from its name; ``"auto"`` (or ``None``) is this machine's."""
    if isinstance(target, Target):
        return target
    if target is None or target == "auto":
        from .machine import machine_info

        return target_for_machine(machine_info())
    found = TARGETS.get(str(target))
    if found is None:
        raise TargetError(
            f"unknown target {target!r}; known: auto, {', '.join(TARGETS)}"
        )
    return found


def fit_weight_bits(bits: int, max_level: int, *, grid: Literal["symmetric", "affine", "odd"]
                    = "symmetric") -> int:
    """The largest bit width ``<= bits`` whose grid stays within ``|level| <= max_level``.

    ``symmetric`` (narrow, zero point 0): levels ``+-(2**(b-1) - 1)``; ``affine`` (signed, full
    range): ``[-2**(b-1), 2**(b-1) - 1]``; ``odd`` (StatsQ's odd levels): ``+-(2**b - 1)``.
    """
    def largest(b: int) -> int:
        if grid == "symmetric":
            return 2 ** (b - 1) - 1
        if grid == "affine":
            return 2 ** (b - 1)
        return 2**b - 1

    while bits > 2 and largest(bits) > max_level:
        bits -= 1
    return bits
