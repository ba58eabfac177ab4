"""Search spaces of every family: parsing, errors that name the key, sampling, models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from slimline.compress.prune.flops import count_params
from slimline.models import build_model
from slimline.search.architecture import Architecture
from slimline.search.grid_families import CNN1dSpace, GRUSpace, ViTSpace
from slimline.search.space import SearchSpace
from slimline.search.space_loading import load_space, space_from_dict
from slimline.search.spaces_grid import GridArchitecture
from slimline.search.spaces_union import UnionSpace

VIT = {
    "family": "vit",
    "name": "tiny-vit",
    "input_shape": [1, 8, 8],
    "patch_size": 2,
    "depths": [1, 2],
    "widths": [12, 16],
    "heads": [3, 4],
    "mlp_ratios": [1, 2],
}
CNN1D = {
    "family": "cnn1d",
    "input_shape": [1, 40],
    "stages": [
        {"widths": [4, 8], "depths": [1, 2], "kernels": [3, 5]},
        {"widths": [8, 16], "depths": [1], "kernels": [3]},
    ],
}
GRU = {"family": "gru", "input_shape": [1, 40], "hidden_sizes": [8, 16, 32], "num_layers": [1, 2]}
RESNET = {
    "input_shape": [1, 8, 8],
    "stages": [{"widths": [4, 8], "depths": [1], "kernels": [3], "stride": 1}],
}


def test_family_dispatch_defaults_to_resnet_flex():
    assert isinstance(space_from_dict(RESNET), SearchSpace)
    assert isinstance(space_from_dict(VIT), ViTSpace)
    assert isinstance(space_from_dict(CNN1D), CNN1dSpace)
    assert isinstance(space_from_dict(GRU), GRUSpace)
    union = space_from_dict({"family": "union", "spaces": [CNN1D, GRU]})
    assert isinstance(union, UnionSpace)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"family": "lstm"}, "family: unknown family 'lstm'"),
        (VIT | {"depth": [1]}, "depth: unknown key for family 'vit'"),
        (VIT | {"heads": [0, 2]}, "heads: expected a non-empty list of positive ints"),
        (VIT | {"widths": [8, 8]}, "widths: choices repeat"),
        (VIT | {"patch_size": 3}, "patch_size: must be a positive integer dividing"),
        (VIT | {"widths": [10], "heads": [3, 4]}, "heads: no width"),
        (VIT | {"input_shape": [1, 40]}, r"input_shape: expected \[C, H, W\]"),
        ({k: v for k, v in GRU.items() if k != "num_layers"}, "num_layers: missing"),
        (GRU | {"input_shape": [1, 8, 8]}, r"input_shape: expected \[C, L\]"),
        (CNN1D | {"stages": [{"widths": [4], "depths": [1], "kernels": [4]}]},
         r"stages\[0\].kernels: kernels must be odd"),
        (CNN1D | {"stages": [{"widths": [4], "depths": [1], "kernel": [3]}]},
         r"stages\[0\].kernel: unknown key"),
        ({"family": "union", "spaces": [GRU, GRU]}, "spaces: each family may appear once"),
        ({"family": "union", "spaces": [GRU], "weights": [1, 2]}, "weights: expected 1"),
        ({"family": "union", "spaces": [GRU | {"hidden_sizes": []}]},
         r"spaces\[0\]: hidden_sizes: expected"),
    ],
)
def test_errors_name_the_bad_key(data, match, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{path}: {match}"):
        load_space(path)


def test_vit_space_counts_only_valid_width_head_pairs_and_builds_them():
    space = space_from_dict(VIT)
    # (width, heads) pairs with width % heads == 0: (12, 3), (12, 4), (16, 4); x 2 depths x 2 ratios.
    assert space.size == 12
    everything = space.sample(100, seed=0)
    assert len(set(everything)) == 12
    assert all(a["width"] % a["heads"] == 0 for a in everything)
    arch = GridArchitecture.make("vit", {"depth": 2, "width": 12, "heads": 3, "mlp_ratio": 2.0})
    model = space.build_model(arch)
    assert len(model.blocks) == 2
    assert model.blocks[0].attn.num_heads == 3 and model.blocks[0].mlp.fc1.out_features == 24
    assert space.model_spec(arch) == {
        "name": "vit",
        "with": {"patch_size": 2, "depth": 2, "dim": 12, "heads": 3, "mlp_ratio": 2.0,
                 "num_classes": 10, "in_channels": 1, "input_size": [8, 8]},
    }
    as_int = space.architecture_from_dict(arch.to_dict() | {"mlp_ratio": 2})
    assert as_int == arch and as_int.digest == arch.digest
    bad = GridArchitecture.make("vit", {"depth": 2, "width": 16, "heads": 3, "mlp_ratio": 2.0})
    with pytest.raises(ValueError, match="width 16 is not divisible by heads 3"):
        space.validate(bad)
    with pytest.raises(ValueError, match=r"depth 5 is not in space 'tiny-vit' \(choices: \[1, 2\]\)"):
        space.validate(GridArchitecture.make("vit", {"depth": 5, "width": 12, "heads": 3,
                                                     "mlp_ratio": 2.0}))


def test_cnn1d_space_builds_stages_of_the_chosen_depth_kernel_and_width():
    space = space_from_dict(CNN1D)
    assert space.size == (2 * 2 * 2) * (2 * 1 * 1)
    arch = GridArchitecture.make("cnn1d", {"widths": [8, 16], "depths": [2, 1],
                                           "kernels": [5, 3]})
    model = space.build_model(arch)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 8, 5, 1), (8, 8, 5, 1), (8, 16, 3, 2)
    ]
    # conv weights + BN (weight, bias) + head, counted by hand
    expected = (1 * 8 * 5 + 16) + (8 * 8 * 5 + 16) + (8 * 16 * 3 + 32) + (16 * 10 + 10)
    assert count_params(model) == expected


def test_cnn1d_zoo_defaults_are_unchanged():
    model = build_model("cnn1d")
    # conv 1->32 k5, 32->64 k5, 64->64 k5, three BNs, Linear 64->10: the pre-search layout
    assert count_params(model) == 160 + 64 + 10240 + 128 + 20480 + 128 + 650
    assert [k for k in model.state_dict() if k.endswith("weight")][:3] == [
        "features.0.weight", "features.1.weight", "features.3.weight"
    ]
    with pytest.raises(ValueError, match="one kernel_size and one depth per stage"):
        build_model("cnn1d", channels=[4, 8], kernel_size=[3])


def test_gru_space_parameter_count_matches_the_gru_equations():
    space = space_from_dict(GRU)
    assert space.size == 6
    arch = GridArchitecture.make("gru", {"hidden_size": 16, "num_layers": 2})
    h = 16
    # Three gates per layer, each W_ih (h x in) + W_hh (h x h) + two biases (Cho et al., 2014).
    layer = lambda n_in: 3 * (h * n_in + h * h + 2 * h)  # noqa: E731
    assert count_params(space.build_model(arch)) == layer(1) + layer(h) + h * 10 + 10


def test_architectures_round_trip_and_hash_by_content():
    for data in (VIT, CNN1D, GRU):
        space = space_from_dict(data)
        first, again = space.sample(5, seed=3), space.sample(5, seed=3)
        assert first == again and len(set(first)) == 5
        for arch in first:
            copy = space.architecture_from_dict(json.loads(json.dumps(arch.to_dict())))
            assert copy == arch and hash(copy) == hash(arch) and copy.digest == arch.digest
        assert space_from_dict(space.to_dict()).digest == space.digest
    same_numbers = [GridArchitecture.make(f, {"hidden_size": 8, "num_layers": 1})
                    for f in ("gru", "lstm")]
    assert same_numbers[0].digest != same_numbers[1].digest


def test_union_space_splits_samples_by_weight_and_dispatches_by_family():
    union = space_from_dict({"family": "union", "name": "mix", "spaces": [CNN1D, GRU],
                             "weights": [3, 1]})
    assert union.size == 16 + 6
    assert union.counts(8) == [6, 2]
    gru_heavy = space_from_dict(union.to_dict() | {"weights": [1, 3]})
    assert gru_heavy.counts(20) == [14, 6]  # gru holds only 6: the rest spills to cnn1d
    archs = union.sample(8, seed=1)
    assert [a.family for a in archs].count("gru") == 2 and len(set(archs)) == 8
    assert union.sample(8, seed=1) == archs
    for arch in archs:
        assert union.architecture_from_dict(arch.to_dict()) == arch
        assert union.model_spec(arch)["name"] == arch.family
    assert space_from_dict(union.to_dict()).digest == union.digest
    with pytest.raises(ValueError, match="has no 'vit' member"):
        union.validate(GridArchitecture.make("vit", {"depth": 1}))


def test_resnet_space_gains_architecture_from_dict():
    space = space_from_dict(RESNET)
    arch = Architecture((8,), (1,), (3,))
    assert space.architecture_from_dict(arch.to_dict()) == arch
    with pytest.raises(ValueError, match="stage 0 width 5"):
        space.architecture_from_dict({"widths": [5], "depths": [1], "kernels": [3]})


def test_non_resnet_spaces_refuse_a_latency_lookup_table_clearly():
    for data in (VIT, GRU, {"family": "union", "spaces": [CNN1D, GRU]}):
        with pytest.raises(ValueError, match="lookup table needs a 'resnet_flex' space"):
            space_from_dict(data).distinct_blocks()


# ---- expansion and skip choices of the CNN space -------------------------------------------

EXPANDING = {
    "name": "exp-skip",
    "input_shape": [1, 8, 8],
    "num_classes": 10,
    "stages": [
        {"widths": [4, 8], "depths": [1, 2], "kernels": [3], "stride": 1,
         "expansions": [1, 2], "skips": [True, False]},
        {"widths": [8], "depths": [1], "kernels": [3], "stride": 2},
    ],
}


def test_expansion_and_skip_are_choices_of_the_cnn_space():
    import torch

    from slimline.search.architecture import Architecture
    from slimline.search.space import SearchSpace

    space = SearchSpace.from_dict(EXPANDING)
    assert space.size == 2 * 2 * 2 * 2
    assert SearchSpace.from_dict(space.to_dict()) == space
    everything = space.sample(space.size)
    assert len({a.digest for a in everything}) == space.size
    lut_keys = {b.key for b in space.distinct_blocks()}
    for arch in everything:
        assert set(space.block_keys(arch)) <= lut_keys  # the LUT covers every architecture
        assert space.architecture_from_dict(arch.to_dict()) == arch
        model = space.build_model(arch)
        block = model.stages[0][0]
        assert block.conv1.out_channels == round(arch.widths[0] * arch.expansion(0))
        assert block.skip == arch.skip(0)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    choices = space.trial_choices()
    assert choices["s0.expansion"] == (1.0, 2.0) and choices["s0.skip"] == (True, False)
    assert "s1.expansion" not in choices  # a single option is not a choice
    # Defaults are canonical: spelling them out does not change identity or the digest.
    plain = Architecture((4, 8), (1, 1), (3, 3))
    assert Architecture((4, 8), (1, 1), (3, 3), (1.0, 1.0), (True, True)) == plain
    assert plain.digest == Architecture.from_dict({"widths": [4, 8], "depths": [1, 1],
                                                   "kernels": [3, 3]}).digest
    with pytest.raises(ValueError, match="skips"):
        SearchSpace.from_dict(EXPANDING | {"stages": [
            {"widths": [4], "depths": [1], "skips": ["yes"]}]})


def test_a_block_without_skip_has_no_residual_path():
    import torch

    from slimline.models.resnet import BasicBlock

    x = torch.rand(1, 4, 6, 6)
    for skip, expected in ((True, torch.relu(x)), (False, torch.zeros_like(x))):
        block = BasicBlock(4, 4, skip=skip, expansion=0.5).eval()
        torch.nn.init.zeros_(block.conv2.weight)  # the residual branch outputs BN's bias: 0
        torch.testing.assert_close(block(x), expected)
        assert block.conv1.out_channels == 2


def test_seqformer_space_builds_torch_transformers_the_attention_proxies_read():
    from slimline.search.grid_families import SeqformerSpace
    from slimline.search.proxies import ProxyInputs, score_architecture

    space = space_from_dict({"family": "seqformer", "name": "s", "input_shape": [1, 40],
                             "num_classes": 10, "depths": [1, 2], "widths": [12, 16],
                             "heads": [3, 4], "mlp_ratios": [2.0]})
    assert isinstance(space, SeqformerSpace)
    assert space.size == 2 * 3  # (12, 3), (12, 4), (16, 4) x 2 depths
    arch = GridArchitecture.make("seqformer", {"depth": 2, "width": 12, "heads": 3,
                                               "mlp_ratio": 2.0})
    model = space.build_model(arch)
    layers = model.encoder.layers
    assert len(layers) == 2 and layers[0].self_attn.num_heads == 3
    assert layers[0].linear1.out_features == 24
    x = torch.randn(8, 1, 40)
    assert model(x).shape == (8, 10)
    scores = score_architecture(lambda: space.build_model(arch),
                                ["attention_confidence", "synaptic_diversity", "grasp", "params"],
                                ProxyInputs(x, torch.arange(8) % 10, num_classes=10))
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values())
    assert scores["params"] == sum(p.numel() for p in model.parameters())
