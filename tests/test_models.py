"""Model zoo: shapes, argument handling, family-specific structure and ONNX/onnxruntime parity."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from slimline.models import build_model, list_models

SEQUENCE_MODELS = {"cnn1d", "gru", "seqformer"}


def _input(name: str, batch: int, in_channels: int = 1, size: tuple[int, ...] | None = None):
    """A dataset-like batch: digits-style images, or mnist1d-style sequences."""
    if size is None:
        size = (40,) if name in SEQUENCE_MODELS else (8, 8)
    return torch.randn(batch, in_channels, *size)


def _build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    # A few training-mode passes give BatchNorm non-trivial running stats, so parity checks
    # exercise the folded normalisation rather than an identity.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_input(name, 16, kwargs.get("in_channels", 1)) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list_models())
def test_output_shape(name: str) -> None:
    model = _build(name)
    with torch.no_grad():
        assert model(_input(name, 5)).shape == (5, 10)


@pytest.mark.parametrize("name", list_models())
def test_arguments_are_honoured(name: str) -> None:
    # Lists on purpose: recipes come from YAML.
    size = [32] if name in SEQUENCE_MODELS else [12, 12]
    model = build_model(name, num_classes=5, in_channels=3, input_size=size).eval()
    with torch.no_grad():
        assert model(_input(name, 2, in_channels=3, size=tuple(size))).shape == (2, 5)


# nn.GRU re-flattens its weights while traced; the exported graph is unaffected (parity below).
@pytest.mark.filterwarnings("ignore:The tensor attributes self.gru:UserWarning")
@pytest.mark.parametrize("name", list_models())
def test_onnx_export_dynamic_batch_parity(name: str, tmp_path) -> None:
    model = _build(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model,
        (_input(name, 2),),
        path,
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _input(name, 3)
    with torch.no_grad():
        expected = model(x).numpy()
    (actual,) = session.run(None, {"input": x.numpy()})
    assert actual.shape == (3, 10)
    assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.parametrize("depth", [7, 10, 2])
def test_resnet_rejects_invalid_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        build_model("resnet", depth=depth)


def test_resnet20_depth() -> None:
    model = build_model("resnet20")
    convs = [
        m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n
    ]
    assert len(convs) + 1 == 20  # 19 convs on the main path + the fc layer


def test_resnet_block_adds_residual() -> None:
    model = _build("resnet")
    block = model.layer1[0]  # width -> width, stride 1: identity shortcut
    assert isinstance(block.shortcut, nn.Identity)
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        x = torch.randn(4, 16, 8, 8)
        # With the residual branch silenced the block is exactly relu(x + 0).
        torch.testing.assert_close(block(x), torch.relu(x))


def test_resnet_downsampling_uses_projection_shortcut() -> None:
    model = build_model("resnet", width=8)
    shortcut = model.layer2[0].shortcut
    assert isinstance(shortcut[0], nn.Conv2d) and shortcut[0].kernel_size == (1, 1)
    assert shortcut[0].stride == (2, 2) and isinstance(shortcut[1], nn.BatchNorm2d)
    assert model.fc.in_features == 32


def test_vit_has_separate_qkv_per_block() -> None:
    model = build_model("vit", depth=3, dim=32, heads=4)
    modules = dict(model.named_modules())
    for i in range(3):
        for part in ("q", "k", "v", "proj"):
            layer = modules[f"blocks.{i}.attn.{part}"]
            assert isinstance(layer, nn.Linear) and layer.out_features == 32
        for part in ("mlp.fc1", "mlp.fc2"):
            assert isinstance(modules[f"blocks.{i}.{part}"], nn.Linear)
        for part in ("norm1", "norm2"):
            assert isinstance(modules[f"blocks.{i}.{part}"], nn.LayerNorm)
        attn = modules[f"blocks.{i}.attn"]
        assert (attn.num_heads, attn.head_dim) == (4, 8)
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.head, nn.Linear)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dim": 30, "heads": 4}, "heads"), ({"input_size": (9, 8)}, "patch_size")],
)
def test_vit_rejects_bad_shapes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("vit", **kwargs)


def test_mobilenetv2_has_depthwise_convs() -> None:
    model = build_model("mobilenetv2")
    depthwise = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.groups == m.out_channels
    ]
    assert len(depthwise) == 5  # one per inverted residual block, blocks=(1, 2, 2)
    assert isinstance(model.classifier, nn.Linear)


def test_mlp_flattens_any_input() -> None:
    model = build_model("mlp", in_channels=2, input_size=[3, 4, 5], hidden=[16]).eval()
    assert model(torch.randn(7, 2, 3, 4, 5)).shape == (7, 10)


def test_gru_reads_channels_first() -> None:
    model = _build("gru", in_channels=3)
    assert model.gru.batch_first and model.gru.input_size == 3
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        _, h_n = model.gru(x.transpose(1, 2))
        torch.testing.assert_close(model(x), model.head(h_n[-1]))


def test_seqformer_patches_consecutive_steps_into_one_token() -> None:
    model = build_model("seqformer", in_channels=2, input_size=[40], dim=16, patch_size=4).eval()
    assert model.embed.in_features == 2 * 4 and model.position.shape == (1, 10, 16)
    seen = []
    model.embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(3, 2, 40)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
    tokens = seen[0]
    assert tokens.shape == (3, 10, 8)
    # token 1 holds time steps 4..7 of each channel, channel by channel
    torch.testing.assert_close(tokens[:, 1], x[:, :, 4:8].reshape(3, 8))
    with pytest.raises(ValueError, match="patch_size"):
        build_model("seqformer", input_size=[40], patch_size=3)
