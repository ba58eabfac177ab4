"""Latency-targeted channel pruning: per-layer table, cost model, DP, stage, bad input.

Allocation tests use hand-made tables (latency = c * in * out, which bilinear interpolation
represents exactly) so they never depend on timings; one test measures a tiny real table to
check the build pipeline and the interpolation at its grid points.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimline
from slimline.compress.prune.layer_latency import (
    build_layer_latency_table,
    model_layer_widths,
    predict_model_latency,
)
from slimline.compress.prune.structured import StructuredPruningError, prune_channels
from slimline.export.layer_lut import LayerGrid, LayerLatencyTable, LutError, grid_widths
from slimline.models import build_model
from slimline.stage import StageFailed

IMAGE = (1, 1, 8, 8)


def hand_table(
    model: nn.Module, per_mac: float = 1e-4, slow: dict[str, float] | None = None
) -> LayerLatencyTable:
    """``ms = per_mac * in * out * factor`` per layer (corner grid: exact under bilinear)."""
    layers = {}
    for name, (cin, cout) in model_layer_widths(model).items():
        factor = per_mac * (slow or {}).get(name, 1.0)
        ins, outs = sorted({1, cin}), sorted({1, cout})
        layers[name] = LayerGrid(
            name, "conv", cin, cout, [1, cin, 8, 8], ins, outs,
            [[factor * i * o for o in outs] for i in ins],
        )  # fmt: skip
    return LayerLatencyTable(layers, 0.01, 1, 1, {"cpu": "hand"}, {"model": type(model).__name__})


class TwoBranch(nn.Module):
    """Two convs of equal FLOPs and equal weights feeding one classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = F.relu(self.a(x)).mean((2, 3))
        yb = F.relu(self.b(x)).mean((2, 3))
        return self.fc(torch.cat([ya, yb], 1))


@pytest.mark.parametrize("allocation", ["dp", "global", "uniform"])
def test_latency_target_meets_the_predicted_budget(allocation: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet", input_size=IMAGE[2:]).eval()
    table = hand_table(model, slow={"layer2.0.conv2": 4.0})
    before = predict_model_latency(table, model)
    ratio = 0.4
    result = prune_channels(
        model, torch.randn(IMAGE), ratio, target="latency", allocation=allocation,
        round_to=2, latency_table=table, dp_distortion="magnitude",
    )  # fmt: skip
    after = predict_model_latency(table, model)  # from the pruned layers' real widths
    assert result.latency_before_ms == pytest.approx(before)
    assert result.latency_after_ms == pytest.approx(after)  # cost model == pruned model
    assert after <= (1 - ratio) * before + 1e-12
    assert after >= (1 - ratio - 0.15) * before  # and uses most of the budget


def test_slow_layer_is_pruned_more_than_with_flops_cost() -> None:
    x = torch.randn(1, 8, 8, 8)
    kept = {}
    for target in ("flops", "latency"):
        torch.manual_seed(0)
        model = TwoBranch().eval()
        table = hand_table(model, slow={"a": 5.0})  # a: 5x slower than its FLOPs suggest
        result = prune_channels(
            model, x, 0.5, target=target, allocation="dp", dp_distortion="magnitude",
            round_to=2, latency_table=table if target == "latency" else None,
        )  # fmt: skip
        kept[target] = (result.layer_channels["a"][1], result.layer_channels["b"][1])
    assert kept["flops"][0] == kept["flops"][1]  # equal FLOPs, equal weights: balanced
    assert kept["latency"][0] < kept["latency"][1]
    assert kept["latency"][0] < kept["flops"][0]


def test_measured_table_interpolates_exactly_at_grid_points(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    table = build_layer_latency_table(
        model, torch.randn(IMAGE), round_to=2, grid_points=3, warmup=1, runs=3, rounds=1
    )
    grid = table.layers["3"]
    assert (grid.in_widths, grid.out_widths) == ([2, 4, 8], [2, 4, 8])  # shared group: both
    assert grid.fused == ["BatchNorm2d", "ReLU"]  # timed with what the exporter folds/fuses
    assert table.layers["8"].kind == "linear" and table.machine["cpu"]
    for name, layer in table.layers.items():
        for i, cin in enumerate(layer.in_widths):
            for j, cout in enumerate(layer.out_widths):
                assert table.lookup(name, cin, cout) == pytest.approx(layer.ms[i][j])
    # Between grid points: bilinear (the mean of the four corners at the cell centre).
    corners = [grid.ms[i][j] for i in (1, 2) for j in (1, 2)]
    assert grid.lookup(6, 6) == pytest.approx(sum(corners) / 4)
    assert grid.lookup(1, 1) == pytest.approx(grid.ms[0][0])  # clamped below the grid
    path = table.save(tmp_path / "t.json")
    assert LayerLatencyTable.load(path).to_dict() == table.to_dict()


def test_json_round_trip_and_format_check(tmp_path: Path) -> None:
    model = build_model("resnet", input_size=IMAGE[2:])
    table = hand_table(model)
    path = table.save(tmp_path / "layers.json")
    loaded = LayerLatencyTable.load(path)
    assert loaded.to_dict() == table.to_dict()
    assert loaded.predict(model_layer_widths(model)) == pytest.approx(
        predict_model_latency(table, model)
    )
    data = json.loads(path.read_text())
    data["format"] = "slimline-latency-lut"  # a search-space LUT is not a layer table
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(LutError, match="not a slimline layer latency table"):
        LayerLatencyTable.load(tmp_path / "other.json")


def test_grid_widths() -> None:
    assert grid_widths(4, 64, 4, round_to=8) == [4, 24, 48, 64]
    assert grid_widths(16, 16, 4) == [16]
    assert grid_widths(1, 10, 2) == [1, 10]


def test_bad_input_is_reported_clearly() -> None:
    model = build_model("resnet", input_size=IMAGE[2:])
    x = torch.randn(IMAGE)
    table = hand_table(model)
    with pytest.raises(StructuredPruningError, match=r"ratio must be in \[0, 1\)"):
        prune_channels(model, x, 1.0, target="latency", latency_table=table)
    with pytest.raises(StructuredPruningError, match="needs latency_table"):
        prune_channels(model, x, 0.3, target="latency")
    partial = hand_table(model)
    del partial.layers["layer2.0.conv2"]
    with pytest.raises(StructuredPruningError, match="no layer 'layer2.0.conv2'"):
        prune_channels(model, x, 0.3, target="latency", latency_table=partial)
    wider = hand_table(build_model("resnet", input_size=IMAGE[2:], width=32))
    with pytest.raises(StructuredPruningError, match="another model"):
        prune_channels(model, x, 0.3, target="latency", latency_table=wider)
    with pytest.raises(StructuredPruningError, match="cannot remove 95.0% of the latency"):
        prune_channels(model, x, 0.95, target="latency", latency_table=table, max_group_ratio=0.5)


def _recipe(params: dict) -> dict:
    return {
        "name": "latency",
        "seed": 0,
        "model": {"name": "resnet"},
        "data": {"name": "digits"},
        "stages": [{"id": "prune", "uses": "prune.channels", "with": params}],
    }


def test_stage_with_a_given_table_reports_prediction_and_measurement(tmp_path: Path) -> None:
    model = build_model("resnet", input_size=IMAGE[2:])
    path = hand_table(model, per_mac=1e-5).save(tmp_path / "table.json")
    params = {"ratio": 0.3, "target": "latency", "allocation": "dp", "round_to": 2}
    params |= {"latency_table": str(path), "latency_runs": 5}
    result = slimline.run(_recipe(params), run_dir=tmp_path / "run", progress=False)
    metrics = result.record("prune").metrics
    before, after = metrics["latency_predicted_before_ms"], metrics["latency_predicted_after_ms"]
    assert after <= 0.7 * before + 1e-12
    assert metrics["latency_predicted_ratio"] == pytest.approx(after / before)
    assert metrics["latency_measured_after_ms"] > 0
    assert isinstance(metrics["latency_prediction_error"], float)


def test_stage_rejects_a_missing_table(tmp_path: Path) -> None:
    params = {"ratio": 0.3, "target": "latency", "latency_table": str(tmp_path / "none.json")}
    with pytest.raises(StageFailed, match="does not exist"):
        slimline.run(_recipe(params), run_dir=tmp_path / "run", progress=False)


def test_stage_measures_and_records_a_table_when_none_is_given(tmp_path: Path) -> None:
    # ratio 0: a 2-run table of an 8x8 model is mostly noise and fixed costs, so any real
    # budget could be unreachable; this test checks the plumbing (build, cache, record).
    params = {"ratio": 0.0, "target": "latency", "round_to": 4, "allocation": "global"}
    params |= {"latency_grid": 2, "latency_runs": 2}
    result = slimline.run(_recipe(params), run_dir=tmp_path / "run", progress=False)
    files = result.artifact("prune").files
    table = LayerLatencyTable.load(files["latency_table"])
    assert files["latency_table"].name == "layer_latency.json"
    assert "conv1" in table.layers and table.meta["round_to"] == 4
    metrics = result.record("prune").metrics
    assert metrics["latency_predicted_after_ms"] <= metrics["latency_predicted_before_ms"]
    assert metrics["latency_measured_after_ms"] > 0
