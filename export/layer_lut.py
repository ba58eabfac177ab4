"""Per-layer latency table of one model, for latency-targeted channel pruning (torch-free).

Where :mod:`slimline.export.lut` times the distinct blocks of a search space, this table times each
Conv/Linear layer of *one* model at the widths channel pruning can give it: a grid of input
widths x output widths per layer. Grids are coarse (a few widths per side, a multiple of
``round_to`` where possible, always including the smallest reachable and the full width) and
:meth:`LayerGrid.lookup` interpolates bilinearly between grid points; at a grid point it returns
the measured value. Widths outside the grid are clamped to its edge: below the smallest measured
width that *over*-predicts (a smaller layer is not slower), so a budget met by the table is never
met only because of extrapolation.

Entries follow :mod:`slimline.export.lut`'s protocol: each is the layer's median latency minus the fixed
per-run overhead (an empty model), and a whole model is predicted as::

    predicted = overhead_ms + sum(layer.lookup(in_width, out_width) for every layer)

Element-wise work that onnxruntime does not fuse into a Conv (residual adds, pooling) is not in
any entry: the prediction covers the layers the pruner can change plus the overhead.

The JSON file records the machine (:func:`slimline.export.machine.machine_info`) and each layer's full
shape, so a table measured on a target device can be carried to the host that prunes; a table
for another model is rejected naming the layer it lacks (:meth:`LayerLatencyTable.check_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from .lut_manifest import JsonTableFile, LutError

__all__ = ["LayerGrid", "LayerLatencyTable", "LutError", "grid_widths"]

LAYER_LUT_FORMAT = "slimline-layer-latency"
LAYER_LUT_VERSION = 1


def grid_widths(low: int, high: int, points: int, round_to: int = 1) -> list[int]:
    """About ``points`` widths from ``low`` to ``high`` (both included), ascending and distinct;
    inner points are snapped to multiples of ``round_to`` (the widths pruning can choose)."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
    if points < 2 or low == high:
        return sorted({low, high})
    step = max(1, round_to)
    inner = [int(round(w / step)) * step for w in np.linspace(low, high, points)[1:-1]]
    return sorted({low, high, *(w for w in inner if low < w < high)})


@dataclass
class LayerGrid:
    """One layer's latency (ms, overhead removed) at ``in_widths`` x ``out_widths``.

    ``kind``: ``conv``, ``depthwise`` (one axis: in width == out width, ``in_widths`` holds the
    full width only), ``linear`` or ``unused`` (never called in forward: 0 ms). ``input_shape``
    is the layer's input at full width, batch included; ``fused`` lists what was timed with it
    (e.g. ``["BatchNorm2d", "ReLU"]``).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    input_shape: list[int]
    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]  # [len(in_widths)][len(out_widths)]
    fused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        values = np.asarray(self.ms, dtype=np.float64)
        if values.shape != (len(self.in_widths), len(self.out_widths)):
            raise LutError(
                f"layer {self.name!r}: ms grid has shape {values.shape}, expected "
                f"({len(self.in_widths)}, {len(self.out_widths)})"
            )
        for axis in (self.in_widths, self.out_widths):
            if list(axis) != sorted(set(axis)):
                raise LutError(f"layer {self.name!r}: grid widths must be strictly ascending")

    def lookup(self, in_width: float, out_width: float) -> float:
        """Bilinear interpolation (exact at grid points, clamped outside the grid)."""
        values = np.asarray(self.ms, dtype=np.float64)
        rows = [np.interp(out_width, self.out_widths, row) for row in values]
        if self.kind == "depthwise":
            return float(rows[0])
        return float(np.interp(in_width, self.in_widths, rows))


@dataclass
class LayerLatencyTable(JsonTableFile):
    """Per-layer latency grids of one model on one machine; see the module docstring."""
    table_kind: ClassVar[str] = "layer latency table"


    layers: dict[str, LayerGrid]
    overhead_ms: float
    batch_size: int
    threads: int
    machine: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # model, round_to, protocol, time

    def lookup(self, name: str, in_width: float, out_width: float) -> float:
        if name not in self.layers:
            raise LutError(self._missing_message(name))
        return self.layers[name].lookup(in_width, out_width)

    def predict(self, widths: Mapping[str, tuple[int, int]]) -> float:
        """Predicted latency (ms) of a model whose layers have ``{name: (in, out)}`` widths."""
        return self.overhead_ms + sum(self.lookup(n, i, o) for n, (i, o) in widths.items())

    def check_layers(self, expected: Mapping[str, tuple[int, int]]) -> None:
        """Raise :class:`LutError` unless every layer ``{name: (in, out)}`` (unpruned widths) is
        in the table with those widths: a table from another model cannot be used."""
        for name, (cin, cout) in expected.items():
            if name not in self.layers:
                raise LutError(self._missing_message(name))
            grid = self.layers[name]
            if (grid.in_channels, grid.out_channels) != (cin, cout):
                raise LutError(
                    f"latency table layer {name!r} was measured at {grid.in_channels} -> "
                    f"{grid.out_channels} channels but the model's layer is {cin} -> {cout}; "
                    "the table is for another model (or an already pruned one): rebuild it"
                )

    def _missing_message(self, name: str) -> str:
        known = ", ".join(sorted(self.layers)[:8]) or "none"
        return (
            f"latency table has no layer {name!r} (it was built for "
            f"{self.meta.get('model', '?')!r}, layers: {known}); rebuild it for this model"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYER_LUT_FORMAT,
            "version": LAYER_LUT_VERSION,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "overhead_ms": self.overhead_ms,
            "machine": self.machine,
            "meta": self.meta,
            "layers": {name: asdict(grid) for name, grid in sorted(self.layers.items())},
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "layer latency table"
    ) -> LayerLatencyTable:
        if data.get("format") != LAYER_LUT_FORMAT or data.get("version") != LAYER_LUT_VERSION:
            raise LutError(
                f"{source} is not a slimline layer latency table (format "
                f"{data.get('format')!r}, version {data.get('version')!r}; expected "
                f"{LAYER_LUT_FORMAT!r} v{LAYER_LUT_VERSION})"
            )
        try:
            return cls(
                layers={name: LayerGrid(**grid) for name, grid in data["layers"].items()},
                overhead_ms=float(data["overhead_ms"]),
                batch_size=int(data["batch_size"]),
                threads=int(data["threads"]),
                machine=dict(data.get("machine", {})),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError) as exc:
            raise LutError(f"{source}: malformed layer latency table ({exc})") from None

