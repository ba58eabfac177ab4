"""ONNX export, parity checking and graph summaries (torch side of the ``export`` package)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from slimline.export import (
    ExportError,
    OnnxFileError,
    ParityError,
    assert_parity,
    check_parity,
    export_onnx,
    graph_summary,
)


class ConvBnNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Inverse(nn.Module):
    """torch.linalg.inv has no ONNX translation in either exporter (torch 2.13)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.view(-1, 2, 2)
        spd = m @ m.transpose(1, 2) + torch.eye(2)  # always invertible
        return torch.linalg.inv(spd).flatten(1)


class NeedsInverse(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Identity(), Inverse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, tracing does not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A ConvBnNet (trained BN statistics, frozen BN) exported once for the whole module."""
    torch.manual_seed(0)
    model = ConvBnNet()
    model.train()
    for _ in range(3):  # non-trivial running statistics, so BN folding matters
        model(torch.randn(8, 3, 12, 12) * 2 + 1)
    model.bn.eval()  # a deliberately frozen submodule: export must not unfreeze it
    folder = tmp_path_factory.mktemp("export")
    path = export_onnx(model, torch.randn(2, 3, 12, 12), folder / "net.onnx")
    return model, path


def test_export_writes_single_checked_file_and_restores_modes(exported):
    model, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["net.onnx"]  # no .data, no temp
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {p.key: p.value for p in proto.metadata_props}["slimline.exporter"] == "dynamo"
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    assert model.training and model.conv.training and not model.bn.training


def test_parity_at_a_batch_size_other_than_the_example(exported):
    model, path = exported
    torch.manual_seed(1)
    result = check_parity(model, path, torch.randn(7, 3, 12, 12))
    assert result.passed, result
    assert result.num_samples == 7
    assert result.top1_agreement == 1.0
    assert result.max_abs_diff < 1e-4
    assert model.training and not model.bn.training  # check_parity restores modes too
    json.dumps(result.to_dict())


def test_parity_detects_a_perturbed_initializer(exported, tmp_path):
    model, path = exported
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if list(t.dims) == [5, 8])  # fc.weight
    perturbed = numpy_helper.to_array(weight) + np.float32(0.5)
    weight.CopyFrom(numpy_helper.from_array(perturbed, weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))

    inputs = torch.randn(6, 3, 12, 12)
    result = check_parity(model, bad, inputs)
    assert not result.passed
    assert result.max_abs_diff > 0.1
    assert result.max_rel_diff == pytest.approx(result.max_abs_diff / _max_abs(model, inputs))
    with pytest.raises(ParityError, match=r"max \|diff\|") as info:
        assert_parity(model, bad, inputs)
    assert info.value.result == result
    assert assert_parity(model, path, inputs).passed


def test_opset_below_17_is_rejected(tmp_path):
    target = tmp_path / "old.onnx"
    with pytest.raises(ValueError, match="opset"):
        export_onnx(ConvBnNet(), torch.randn(1, 3, 8, 8), target, opset=16)
    assert not target.exists()


def test_unexportable_op_names_op_model_and_module_without_leftovers(tmp_path, capfd):
    target = tmp_path / "sub" / "inv.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(NeedsInverse(), torch.randn(3, 4), target)
    message = str(info.value)
    assert "aten::linalg_inv" in message
    assert "NeedsInverse" in message
    assert "head.1" in message and "Inverse" in message  # the submodule that calls it
    assert "Hint:" in message
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert info.value.op == "aten::linalg_inv"
    assert info.value.module_path == "head.1"
    assert set(info.value.details) == {"dynamo", "torchscript"}
    assert info.value.__cause__ is not None  # the original exporter error stays reachable
    assert not target.exists()
    assert not target.parent.exists() or not any(target.parent.iterdir())
    # Neither exporter's graph dumps nor warnings reach the user's terminal.
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err
    assert "torchvision" not in out + err


def test_falls_back_to_legacy_exporter_quietly(tmp_path, caplog, capfd):
    torch.manual_seed(0)
    model, example = DataDependent(), torch.randn(2, 4)
    with caplog.at_level("WARNING", logger="slimline.export.onnx_export"):
        path = export_onnx(model, example, tmp_path / "dd.onnx")
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["slimline.exporter"] == "torchscript"
    assert any("legacy TorchScript exporter" in r.getMessage() for r in caplog.records)
    assert check_parity(model, path, example).passed  # traced on this input's branch
    out, err = capfd.readouterr()
    assert "GraphModule" not in out + err and "def forward" not in out + err


def test_opset_17_file_really_has_opset_17(tmp_path):
    # torch 2.13's dynamo exporter silently keeps opset 18 for ReduceMean; the legacy
    # fallback must produce the opset that was asked for.
    path = export_onnx(ConvBnNet(), torch.randn(2, 3, 8, 8), tmp_path / "o17.onnx", opset=17)
    assert graph_summary(path).opset == 17


def test_graph_summary_counts_ops_and_sparsity(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )
    with torch.no_grad():
        for module in (model[0], model[4]):
            flat = module.weight.view(-1)
            flat[::2] = 0.0  # zero every other weight: exactly half (rounded up)
    path = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "sparse.onnx")
    summary = graph_summary(path)

    weights = [p for p in model.parameters() if p.dim() >= 2]
    weight_count = sum(p.numel() for p in weights)
    weight_zeros = sum(int((p == 0).sum()) for p in weights)
    all_params = sum(p.numel() for p in model.parameters())
    all_nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert summary.weight_count == weight_count == 8 * 3 * 3 * 3 + 10 * 8
    assert summary.weight_zeros == weight_zeros == (216 + 1) // 2 + 80 // 2
    assert summary.sparsity == pytest.approx(weight_zeros / weight_count)
    # Initializers also hold the exporter's small int64 shape constants (Reshape/ReduceMean).
    assert all_params <= summary.parameter_count <= all_params + 8
    assert all_nonzero <= summary.nonzero_parameters <= all_nonzero + 8
    assert summary.parameter_bytes >= 4 * all_params
    assert summary.op_counts["Conv"] == 1 and summary.op_counts["Gemm"] == 1
    assert summary.num_nodes == sum(summary.op_counts.values())
    assert summary.opset == 18
    assert summary.file_bytes == path.stat().st_size
    assert summary.inputs[0].shape == ("batch", 3, 8, 8) and summary.inputs[0].dtype == "float32"
    assert summary.outputs[0].shape == ("batch", 10)
    json.dumps(summary.to_dict())


def test_graph_summary_rejects_a_torch_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.save(ConvBnNet().state_dict(), checkpoint)
    with pytest.raises(OnnxFileError, match="not an ONNX model"):
        graph_summary(checkpoint)


def _max_abs(model: nn.Module, inputs: torch.Tensor) -> float:
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        value = float(model(inputs).abs().max())
    for module, mode in was_training.items():
        module.training = mode
    return value


def test_gelu_is_exported_in_the_grouping_onnxruntime_fuses(tmp_path):
    """torch writes x * (0.5 * (1 + erf(x / sqrt 2))); regrouped as (x * 0.5) * (...),
    onnxruntime runs the Linear's bias and the GELU as one BiasGelu (before: six ops)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    x = torch.randn(5, 8)
    path = export_onnx(model, x, tmp_path / "gelu.onnx")
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("Erf") == 1
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Erf" not in fused and {"BiasGelu", "Gelu"} & set(fused), fused
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-6)
