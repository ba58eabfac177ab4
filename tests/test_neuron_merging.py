"""Neuron Merging and the plain channel baseline: exact merge of a scaled copy, the choice of
partner, the similarity threshold, and stage outputs that save and reload with fewer channels."""

from __future__ import annotations

import copy

import torch

from slimline.artifact import Artifact
from slimline.compress.prune.datafree_sites import ChannelFilters, channel_filters, find_prune_sites
from slimline.compress.prune.neuron_merging import merge_scales, prune_sites
from slimline.models import build_model
from slimline.stage import get_stage
from tests.datafree_models import calibrate_bn, combination_net, tripwire_context


def test_a_scaled_copy_is_merged_exactly_with_bn() -> None:
    # Channel 3's pre-activation is 0.8 x channel 1's, through different BN gammas and betas.
    model, pruned = combination_net((0.0, 0.8, 0.0), always_active=False)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        reference = model(x)
    site = find_prune_sites(model, x[:1]).sites[0]
    filters = channel_filters(model, site)
    scales = merge_scales(filters, torch.tensor([pruned]))
    assert torch.allclose(scales, torch.tensor([[0.0, 0.8, 0.0]], dtype=torch.float64), atol=1e-6)
    merged, plain = copy.deepcopy(model), copy.deepcopy(model)
    result = prune_sites(merged, x[:1], 0.25, compensation="merge")
    assert result.sites["0"]["removed"] == [pruned] and result.sites["0"]["merged"] == 1
    prune_sites(plain, x[:1], 0.25, compensation="none")
    with torch.no_grad():
        assert torch.allclose(merged(x), reference, atol=1e-4 * float(reference.abs().max()))
        assert not torch.allclose(plain(x), reference, atol=1e-2 * float(reference.abs().max()))


def _filters(weight: list[list[float]], shift: list[float] | None = None) -> ChannelFilters:
    w = torch.tensor(weight, dtype=torch.float64)
    s = torch.tensor(shift or [0.0] * len(weight), dtype=torch.float64)
    return ChannelFilters(w, torch.ones(len(weight), dtype=torch.float64), s, w)


def test_partner_choice_bias_distance_and_threshold() -> None:
    # Channel 0 is pruned; 1 is parallel to it, 2 is nearly parallel with a matching bias.
    filters = _filters([[2.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], [2.0, 5.0, 1.0, 0.0])
    by_cosine = merge_scales(filters, torch.tensor([0]), lam=1.0)
    assert by_cosine[0, 0] == 2.0 and by_cosine[0].count_nonzero() == 1
    with_bias = merge_scales(filters, torch.tensor([0]), lam=0.5)
    assert with_bias[0, 1] > 0 and with_bias[0].count_nonzero() == 1  # bias 2 = 2 x 1 fits
    orthogonal = _filters([[1.0, 0.0], [0.0, 1.0], [0.0, -2.0]])
    assert merge_scales(orthogonal, torch.tensor([0]), threshold=0.1).count_nonzero() == 0
    # A kept channel with the opposite BN sign is anti-parallel after folding: never merged.
    flipped = ChannelFilters(
        orthogonal.weight[[0, 0]],
        torch.tensor([1.0, -1.0], dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64),
        orthogonal.weight[[0, 0]],
    )
    assert merge_scales(flipped, torch.tensor([0])).count_nonzero() == 0


def test_pruning_stages_shrink_save_and_reload(tmp_path) -> None:
    torch.manual_seed(0)
    model = calibrate_bn(build_model("mobilenetv2"), (1, 8, 8))
    spec = {"name": "mobilenetv2"}
    x = torch.randn(8, 1, 8, 8)
    for uses in ("prune.neuron_merging", "prune.plain_channels"):
        stage = get_stage(uses)
        source = Artifact(model=copy.deepcopy(model), model_spec=spec, input_shape=(1, 8, 8))
        out = stage.function(
            tripwire_context(uses, uses, tmp_path), [source], stage.params(prune_ratio=0.5)
        )
        assert out.metrics["channels_after"] == out.metrics["channels_before"] // 2
        assert out.metrics["params_after"] < out.metrics["params_before"]
        out.save(tmp_path / uses)
        loaded = Artifact.load(tmp_path / uses)
        assert loaded.model.features[4].conv[3].groups == 32  # depthwise: 64 -> 32 channels
        with torch.no_grad():
            assert torch.equal(loaded.model.eval()(x), out.model(x))
        assert loaded.state["pruning"]["method"] == uses.split(".")[1]


def test_mean_correction_restores_a_constant_channel() -> None:
    # Channel 3 has gamma 0: after BN + ReLU it is the constant relu(beta) = 2 everywhere, so
    # removing it loses exactly W[:, 3] * 2, which the consumer's BN running mean takes back.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 1, bias=False),
        torch.nn.BatchNorm2d(2),
    )
    with torch.no_grad():
        model[0].weight[3].mul_(1e-3)  # smallest filter: the one pruned
        model[1].weight[3], model[1].bias[3] = 0.0, 2.0
    model.eval()
    x = torch.randn(8, 3, 5, 5)
    with torch.no_grad():
        reference = model(x)
        for corrected in (False, True):
            pruned = copy.deepcopy(model)
            result = prune_sites(
                pruned, x[:1], 0.25, compensation="none", mean_correction=corrected
            )
            assert result.sites["0"]["removed"] == [3]
            close = torch.allclose(pruned(x), reference, atol=1e-5)
            assert close == corrected


def test_every_method_prunes_the_channels_ranked_on_the_trained_model() -> None:
    # cnn1d is a plain chain: features.3 consumes features.0's site and is a site itself, so a
    # repair of features.0 changes features.3's filter norms. The benchmark compares methods
    # on the same channels, so all of them must rank on the weights they were given.
    from slimline.compress.prune.datafree_sites import select_channels
    from slimline.compress.quant.udfc import udfc_compress

    torch.manual_seed(0)
    model = calibrate_bn(build_model("cnn1d", channels=[16, 32, 32]), (1, 40))
    example = torch.randn(1, 1, 40)
    expected = {
        site.name: select_channels(channel_filters(model, site), 0.5, "l1").tolist()
        for site in find_prune_sites(model, example).sites
    }
    assert set(expected) == {"features.0", "features.3", "features.6"}
    removed = {}
    for method in ("none", "merge"):
        result = prune_sites(copy.deepcopy(model), example, 0.5, compensation=method)
        removed[method] = {name: site["removed"] for name, site in result.sites.items()}
    for bits in (None, 4):
        result = udfc_compress(copy.deepcopy(model), example, prune_ratio=0.5, weight_bits=bits)
        removed[f"udfc{bits}"] = {name: site["removed"] for name, site in result.sites.items()}
    for method, channels in removed.items():
        assert channels == expected, method
