"""The values a ``resnet_flex`` search produces and keys its caches on, apart from the space.

Architectures, block shapes and their content digests are what studies, ground-truth fixtures,
latency lookup tables and reports store and compare, so they live here as plain frozen data with
no space logic and no torch: anything that only reads or hashes results (and the grid and union
families, for :func:`content_digest`) imports this module without the space's validation and
model-building code in :mod:`slimline.search.space`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Architecture", "BlockSpec", "StageChoices", "content_digest"]


def content_digest(data: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit hash of JSON-able ``data`` (same in every process and Python version):
    the identity of spaces and architectures, and the key of every cache built on them."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageChoices:
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...] = (3,)
    stride: int = 1
    expansions: tuple[float, ...] = (1.0,)  # inner conv width / block width
    skips: tuple[bool, ...] = (True,)  # residual connection on / off


@dataclass(frozen=True)
class Architecture:
    """One choice per stage. Equal architectures are equal, hash equally and share a digest.

    ``expansions`` / ``skips`` are empty when every stage has the defaults (1.0, residual on),
    so architectures of spaces without those choices keep the digests they always had.
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expansions: tuple[float, ...] = ()
    skips: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if all(e == 1.0 for e in self.expansions):
            object.__setattr__(self, "expansions", ())
        if all(self.skips):
            object.__setattr__(self, "skips", ())

    def expansion(self, stage: int) -> float:
        return self.expansions[stage] if self.expansions else 1.0

    def skip(self, stage: int) -> bool:
        return self.skips[stage] if self.skips else True

    def to_dict(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {k: list(getattr(self, k))
                                     for k in ("widths", "depths", "kernels")}
        if self.expansions:
            out["expansions"] = list(self.expansions)
        if self.skips:
            out["skips"] = list(self.skips)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[Any]]) -> Architecture:
        return cls(*(tuple(int(v) for v in data[k]) for k in ("widths", "depths", "kernels")),
                   tuple(float(v) for v in data.get("expansions", ())),
                   tuple(bool(v) for v in data.get("skips", ())))

    @property
    def digest(self) -> str:
        """Stable 16-hex-digit content hash (the same in every process and Python version)."""
        return content_digest(self.to_dict())

    def __str__(self) -> str:
        return "-".join(
            f"w{w}d{d}k{k}" + (f"e{self.expansion(i):g}" if self.expansion(i) != 1.0 else "")
            + ("" if self.skip(i) else "n")
            for i, (w, d, k) in enumerate(zip(self.widths, self.depths, self.kernels))
        )


@dataclass(frozen=True)
class BlockSpec:
    """One latency-relevant part of a network, with its input shape (batch excluded)."""

    kind: Literal["stem", "block", "head"]
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    input_size: tuple[int, int]
    expansion: float = 1.0
    skip: bool = True

    @property
    def key(self) -> str:
        """Lookup-table key, e.g. ``block:c16-32:k3:s2:r8x8`` (``:e2`` / ``:noskip`` appended
        for a non-default expansion / no residual)."""
        h, w = self.input_size
        return (
            f"{self.kind}:c{self.in_channels}-{self.out_channels}:k{self.kernel}:s{self.stride}"
            f":r{h}x{w}" + (f":e{self.expansion:g}" if self.expansion != 1.0 else "")
            + ("" if self.skip else ":noskip")
        )

    @property
    def output_size(self) -> tuple[int, int]:
        # Same padding (kernel // 2) with an odd kernel: ceil(size / stride) for any kernel.
        return tuple(math.ceil(s / self.stride) for s in self.input_size)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"input_size": list(self.input_size), "key": self.key}
