"""N:M sparsity: exact group counts, conv grouping, errors, masks through fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimline
from slimline.compress.prune.nm import NMConfig, NMError, nm_mask, nm_prune, nm_violations
from slimline.models import build_model
from slimline.params import ParamError, parse_params
from slimline.stage import StageFailed


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_every_group_keeps_exactly_n(n: int, m: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet", width=16)
    result = nm_prune(model, n, m, exclude=r"^conv1\.")  # the stem has one input channel
    parameters = dict(model.named_parameters())
    assert "fc.weight" in result.masks and "layer1.0.conv1.weight" in result.masks
    for name in result.masks:
        weight = parameters[name].detach()
        # Conv: groups run along input channels at each kernel position; Linear: along inputs.
        moved = weight.movedim(1, -1) if weight.dim() > 2 else weight
        nonzero = (moved.reshape(-1, m) != 0).sum(1)
        assert bool((nonzero == n).all()), name
        assert nm_violations(weight, n, m) == 0
        assert (weight == 0).float().mean().item() == pytest.approx(1 - n / m)


def test_conv_groups_are_input_channels_at_one_kernel_position() -> None:
    weight = torch.zeros(1, 4, 1, 2)
    weight[0, :, 0, 0] = torch.tensor([1.0, 4.0, 2.0, 3.0])  # position 0: keep channels 1, 3
    weight[0, :, 0, 1] = torch.tensor([9.0, 1.0, 8.0, 2.0])  # position 1: keep channels 0, 2
    mask = nm_mask(weight, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [False, True, False, True]
    assert mask[0, :, 0, 1].tolist() == [True, False, True, False]


def test_ties_keep_exactly_n_by_position() -> None:
    mask = nm_mask(torch.ones(3, 8), 2, 4)
    assert mask.sum().item() == 12
    assert mask[0].tolist() == [True, True, False, False] * 2


def test_indivisible_layer_is_named_or_skipped() -> None:
    model = build_model("mlp", hidden=(30, 16))
    with pytest.raises(NMError, match=r"layer 'features\.3\.weight': input dimension 30 .* M=4"):
        nm_prune(model, 2, 4)
    result = nm_prune(model, 2, 4, on_indivisible="skip")
    assert set(result.skipped) == {"features.3.weight"}
    assert model.features[3].weight.count_nonzero() == model.features[3].weight.numel()
    with pytest.raises(NMError, match=r"'features\.3\.conv\.3\.weight'.*\(a depthwise conv"):
        nm_prune(build_model("mobilenetv2"), 2, 4, include=r"features\.3\.conv\.3\.")


def test_bad_pattern_regex_and_weights() -> None:
    with pytest.raises(NMError, match="1 <= n < m"):
        nm_mask(torch.ones(4, 4), 4, 4)
    with pytest.raises(NMError, match=r"match no prunable weight.*features\.1\.weight"):
        nm_prune(build_model("mlp"), 2, 4, include="^nothing")
    model = build_model("mlp")
    with torch.no_grad():
        model.head.weight[0, 0] = math.inf
    with pytest.raises(NMError, match=r"'head\.weight' has NaN or inf"):
        nm_prune(model, 2, 4)
    with pytest.raises(ParamError, match="n: must be in"):
        parse_params(NMConfig, {"n": 4, "m": 4})
    with pytest.raises(ParamError, match="m: must be at least 2"):
        parse_params(NMConfig, {"n": 1, "m": 1})


def test_stage_masks_survive_fine_tuning_and_export(tmp_path: Path) -> None:
    recipe = {
        "name": "nm",
        "seed": 0,
        "model": {"name": "mlp", "with": {"hidden": [32]}},
        "data": {"name": "digits"},
        "stages": [
            {"id": "prune", "uses": "prune.nm", "with": {"n": 2, "m": 4}},
            {"id": "tune", "uses": "train", "with": {"epochs": 1}},
            {"id": "export", "uses": "export.onnx", "with": {"parity_samples": 16}},
        ],
    }
    result = slimline.run(recipe, run_dir=tmp_path, progress=False)
    metrics = result.record("prune").metrics
    assert metrics["pattern"] == "2:4" and metrics["sparsity"] == pytest.approx(0.5)
    assert metrics["layer_sparsity"] == {"features.1.weight": 0.5, "head.weight": 0.5}
    tuned = result.artifact("tune")
    for name, weight in tuned.model.named_parameters():
        if name in tuned.masks:
            assert nm_violations(weight, 2, 4) == 0, name
    assert result.record("export").metrics["top1_agreement"] == 1.0


def test_stage_error_names_the_layer(tmp_path: Path) -> None:
    recipe = {
        "name": "nm",
        "seed": 0,
        "model": {"name": "resnet"},
        "data": {"name": "digits"},
        "stages": [{"id": "prune", "uses": "prune.nm", "with": {"n": 2, "m": 4}}],
    }
    with pytest.raises(StageFailed, match=r"'prune' \(prune.nm\): layer 'conv1\.weight'"):
        slimline.run(recipe, run_dir=tmp_path, progress=False)


def test_rnn_weights_group_along_inputs() -> None:
    gru = nn.GRU(8, 4)
    mask = nm_mask(gru.weight_ih_l0, 1, 4, "gru.weight_ih_l0")
    assert mask.shape == (12, 8) and bool((mask.reshape(-1, 4).sum(1) == 1).all())
