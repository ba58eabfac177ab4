"""Structured channel/head pruning: exactness, every zoo model end to end, budgets, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimline
from slimline.artifact import Artifact
from slimline.compress.prune.channel_allocation import group_levels
from slimline.compress.prune.channel_groups import find_channel_groups
from slimline.compress.prune.channels import ChannelConfig
from slimline.compress.prune.flops import count_flops
from slimline.compress.prune.magnitude import magnitude
from slimline.compress.prune.structured import StructuredPruningError, prune_channels
from slimline.models import build_model
from slimline.params import ParamError, parse_params
from slimline.stage import StageFailed

IMAGE = (1, 1, 8, 8)
SEQUENCE = (1, 1, 40)


def _zero_units(group, units: list[int]) -> None:
    """Zero everything that produces the given units, so they contribute nothing downstream."""
    channels = set(group.units_to_channels(torch.tensor(units)))
    with torch.no_grad():
        for item in group.tp_group:
            layer = item.dep.target.module
            if not isinstance(
                layer, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
            ):
                continue
            if not group.tp_group._DG.is_out_channel_pruning_fn(item.dep.handler):
                continue
            local = [i for i, r in zip(item.idxs, item.root_idxs) if r in channels]
            layer.weight[local] = 0
            if layer.bias is not None:
                layer.bias[local] = 0


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "vit", "mlp", "cnn1d"])
def test_removing_zero_importance_units_leaves_outputs_unchanged(name: str) -> None:
    shape = SEQUENCE if name == "cnn1d" else IMAGE
    torch.manual_seed(0)
    model = build_model(name, input_size=shape[2:]).eval()
    x = torch.randn(4, *shape[1:])
    ratio = 0.25
    for group in find_channel_groups(model, x[:1]).groups:
        count = group.size - round(group.size * (1 - ratio))  # what uniform removes
        units = torch.randperm(group.size)[:count].tolist()  # not just the first ones
        _zero_units(group, units)
    expected = model(x)
    result = prune_channels(model, x[:1], ratio)
    assert result.flops_after < result.flops_before
    assert torch.allclose(model(x), expected, atol=1e-5), (model(x) - expected).abs().max()
    if name == "vit":
        assert result.heads == {f"blocks.{i}.attn": [4, 3] for i in range(4)}
        assert model.blocks[0].attn.num_heads == 3 and model.blocks[0].attn.q.out_features == 48


ZOO_CASES = {
    "resnet": ({"ratio": 0.5, "target": "flops", "allocation": "dp", "round_to": 4}, "digits"),
    "mobilenetv2": ({"ratio": 0.4, "target": "flops", "allocation": "global"}, "digits"),
    "vit": ({"ratio": 0.5, "allocation": "uniform", "importance": "l2"}, "digits"),  # 4 blocks
    "mlp": ({"ratio": 0.5, "allocation": "global"}, "digits"),
    "cnn1d": ({"ratio": 0.3, "ignore": "^features\\.0$"}, "mnist1d"),
}


@pytest.mark.parametrize("name", list(ZOO_CASES))
def test_zoo_model_prunes_exports_and_roundtrips(name: str, tmp_path: Path) -> None:
    params, data = ZOO_CASES[name]
    recipe = {
        "name": name,
        "seed": 0,
        "model": {"name": name},
        "data": {"name": data},
        "stages": [
            {"id": "prune", "uses": "prune.channels", "with": params},
            {"id": "export", "uses": "export.onnx", "with": {"parity_samples": 16}},
        ],
    }
    result = slimline.run(recipe, run_dir=tmp_path, progress=False)
    metrics = result.record("prune").metrics
    assert metrics["flops_after"] < metrics["flops_before"]
    assert result.record("export").metrics["top1_agreement"] == 1.0
    if params.get("target") == "flops":
        assert 1 - params["ratio"] - 0.05 <= metrics["flops_ratio"] <= 1 - params["ratio"]
    loaded = result.artifact("prune")  # rebuilt from spec + recorded structure + weights
    assert "structure" in loaded.model_spec
    assert loaded.files["channels_png"].exists()
    pruning = loaded.state["pruning"]
    assert pruning["method"] == "channels" and pruning["layer_channels"]
    x = loaded.example_input(3)
    fresh = count_flops(loaded.model, x[:1])
    assert fresh.total == metrics["flops_after"]  # the reported FLOPs match a recount
    assert metrics["flops_ratio"] == pytest.approx(fresh.total / metrics["flops_before"])
    exported = result.artifact("export")
    assert torch.allclose(loaded.model.eval()(x), exported.model.eval()(x), atol=1e-6)
    if name == "cnn1d":
        assert pruning["layer_channels"]["features.0"] == [32, 32]  # ignored: kept whole


def test_round_to_holds_for_every_group() -> None:
    model = build_model("resnet", width=24)
    x = torch.randn(IMAGE)
    result = prune_channels(model, x, 0.45, target="flops", allocation="global", round_to=8)
    for name, group in result.groups.items():
        assert group["after"] % 8 == 0 or group["after"] == group["before"], name
    assert model.layer1[0].conv1.out_channels % 8 == 0
    assert result.flops_ratio <= 0.55


def test_levels_respect_round_to_and_max_group_ratio() -> None:
    group = find_channel_groups(build_model("mlp"), torch.randn(IMAGE)).group("features.1")
    assert group_levels(group, 8, 0.9).tolist() == list(range(32, 257, 8))
    assert group_levels(group, 1, 0.5)[0] == 128


@pytest.mark.parametrize("allocation", ["uniform", "global", "dp"])
def test_flops_target_is_met_and_reported_ratio_matches_recount(allocation: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet", width=16)
    x = torch.randn(IMAGE)
    before = count_flops(model, x).total
    result = prune_channels(model, x, 0.4, target="flops", allocation=allocation)
    after = count_flops(model, x).total
    assert result.flops_before == before and result.flops_after == after
    assert 0.55 <= result.flops_ratio <= 0.6
    assert result.params_after == sum(p.numel() for p in model.parameters())


def test_bert_heads_and_ffn_prune_run_and_export(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from slimline.export import check_parity, export_onnx

    class TinyBert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.BertConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=16,
                attn_implementation="eager",
            )
            self.bert = transformers.BertModel(config, add_pooling_layer=False)
            self.head = nn.Linear(32, 3)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.bert(input_ids=input_ids).last_hidden_state[:, 0])

    torch.manual_seed(0)
    model = TinyBert().eval()
    ids = torch.randint(0, 64, (2, 12))
    result = prune_channels(model, ids[:1], 0.5)
    attention = model.bert.encoder.layer[0].attention.self
    assert result.heads["bert.encoder.layer.0.attention.self"] == [4, 2]
    assert attention.num_attention_heads == 2 and attention.all_head_size == 16
    assert attention.query.out_features == 16
    assert model.bert.encoder.layer[0].attention.output.dense.in_features == 16
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == 32
    assert any("LayerNorm" in why for why in result.skipped.values())  # residual width kept
    path = export_onnx(model, ids, tmp_path / "bert.onnx")
    assert check_parity(model, path, torch.randint(0, 64, (3, 12))).passed


def test_masks_are_sliced_with_the_weights() -> None:
    torch.manual_seed(0)
    model = build_model("resnet")
    masks = magnitude(model, 0.5)
    prune_channels(model, torch.randn(IMAGE), 0.5, masks=masks)
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        assert mask.shape == parameters[name].shape, name
        assert bool(((parameters[name] != 0) <= mask).all()), name  # zeros stay where masked


def test_gru_is_refused_naming_the_layer() -> None:
    with pytest.raises(StructuredPruningError, match=r"'gru'.*GRU.*not supported"):
        prune_channels(build_model("gru"), torch.randn(SEQUENCE), 0.3)


class _ConvIntoGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 16, 3, padding=1)
        self.gru = nn.GRU(16, 8, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, hidden = self.gru(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(hidden[-1])


def test_channels_feeding_an_unsupported_layer_are_left_alone() -> None:
    graph = find_channel_groups(_ConvIntoGRU(), torch.randn(SEQUENCE))
    assert graph.groups == []
    assert "layer 'gru' (GRU) is not supported" in graph.skipped["conv"]


def test_transformer_residual_width_prunes_with_prune_embedding(tmp_path: Path) -> None:
    spec = {"name": "vit", "with": {"depth": 1}}
    model = build_model("vit", depth=1).eval()
    x = torch.randn(2, *IMAGE[1:])
    result = prune_channels(model, x[:1], 0.25, prune_embedding=True)
    assert result.heads == {"blocks.0.attn": [4, 3]}
    assert model.pos_embed.shape[-1] == model.norm.normalized_shape[0] == 48
    Artifact(model=model, model_spec=spec, input_shape=IMAGE[1:]).save(tmp_path)
    assert torch.allclose(Artifact.load(tmp_path).model.eval()(x), model(x), atol=1e-6)


def test_bad_ratio_budget_regex_and_weights() -> None:
    x = torch.randn(IMAGE)
    with pytest.raises(StructuredPruningError, match=r"ratio must be in \[0, 1\)"):
        prune_channels(build_model("mlp"), x, 1.0)
    with pytest.raises(StructuredPruningError, match="cannot remove 99.0% of the flops"):
        prune_channels(build_model("resnet"), x, 0.99, target="flops", allocation="dp")
    with pytest.raises(
        StructuredPruningError,
        match=r"ignore='\^nope' matches no Conv/Linear.*"
        r"features\.1",
    ):
        prune_channels(build_model("mlp"), x, 0.3, ignore="^nope")
    model = build_model("mlp")
    with torch.no_grad():
        model.features[1].weight[0, 0] = math.nan
    with pytest.raises(StructuredPruningError, match=r"'features\.1\.weight' has NaN or inf"):
        prune_channels(model, x, 0.3)
    with pytest.raises(ParamError, match=r"ratio: must be in \[0.0, 1.0\)"):
        parse_params(ChannelConfig, {"ratio": 1.5})
    with pytest.raises(ParamError, match="allocation: expected one of"):
        parse_params(ChannelConfig, {"allocation": "greedy"})


class _FixedMixing(nn.Module):
    """Mixes channels with a fixed buffer: an op Torch-Pruning takes for element-wise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.register_buffer("mixing", torch.randn(8, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3)) @ self.mixing
        return self.head(y)


class _NotTraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> dict:
        return {"not": "a tensor", "logits": int(self.fc(x.flatten(1)).argmax())}


def test_torch_pruning_failures_are_translated() -> None:
    with pytest.raises(
        StructuredPruningError,
        match=r"fails at op aten::mm in _FixedMixing.forward\(\) after layer 'conv'",
    ):
        prune_channels(_FixedMixing(), torch.randn(IMAGE), 0.5)
    with pytest.raises(StructuredPruningError, match="could not trace _NotTraceable"):
        prune_channels(_NotTraceable(), torch.randn(IMAGE), 0.5)


def test_stage_reports_unreachable_budget(tmp_path: Path) -> None:
    recipe = {
        "name": "bad",
        "seed": 0,
        "model": {"name": "mlp"},
        "data": {"name": "digits"},
        "stages": [
            {
                "id": "prune",
                "uses": "prune.channels",
                "with": {"ratio": 0.95, "target": "flops", "max_group_ratio": 0.5},
            }
        ],
    }
    with pytest.raises(StageFailed, match=r"'prune' \(prune.channels\): cannot remove 95.0%"):
        slimline.run(recipe, run_dir=tmp_path, progress=False)


def test_flops_of_torch_transformer_layers_count_their_attention():
    """torch's TransformerEncoderLayer runs a fused fast path in eval mode, and its attention a
    fused CPU kernel: both hide matmuls from the counter unless counting turns them off."""
    from slimline.models import build_model

    model = build_model("seqformer", dim=16, depth=2, heads=2, mlp_ratio=2.0)
    tokens, dim, ffn = 40, 16, 32
    per_layer = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * ffn) \
        + 2 * 2 * tokens * tokens * dim  # q k^T and attn v over both heads
    expected = 2 * per_layer + 2 * tokens * 1 * dim + 2 * dim * 10  # + embedding and head
    assert count_flops(model, torch.randn(1, 1, 40)).total == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored
