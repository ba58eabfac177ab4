"""Every compression stage on the kinds of model users bring (tests/hf_models.py): Hugging Face
BERT, GPT-2 and ViT built from configs, and torch's own nn.TransformerEncoder. Each test asserts
what the method promises on that model, or the clear refusal a user gets where it does not apply.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slimline.compress.deploy import ExportConfig, export_model  # noqa: E402
from slimline.compress.methods import MethodError, prune, quantize  # noqa: E402
from slimline.compress.prune.channels import ChannelConfig  # noqa: E402
from slimline.compress.prune.importance import TRANSFORMER_MODULES, assign_modules  # noqa: E402
from slimline.compress.prune.magnitude import prunable_weights  # noqa: E402
from slimline.compress.prune.nm import NMConfig  # noqa: E402
from slimline.compress.prune.unstructured import UnstructuredConfig  # noqa: E402
from slimline.compress.quant.datafree import DataFreeConfig, DFQConfig  # noqa: E402
from slimline.compress.quant.qat.config import QATConfig  # noqa: E402
from slimline.compress.quant.rtn import RTNConfig, quantizable_modules  # noqa: E402
from slimline.compress.quant.udfc import UDFCConfig  # noqa: E402
from tests.hf_models import SEQ, TOKENS, USER_MODELS, bert, build, dataset

MODELS = list(USER_MODELS)


def _rel_mse(model, reference, x) -> float:
    with torch.no_grad():
        out = model(x)
    return float((out - reference).pow(2).mean() / reference.pow(2).mean())


def _sparsity(masks) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / sum(m.numel() for m in masks.values())


@pytest.mark.parametrize("name", MODELS)
def test_prunable_weights_cover_attention_and_skip_tied_ones(name):
    model, _ = build(name)
    names = set(prunable_weights(model))
    if name == "gpt2":  # c_attn/c_proj were Conv1D: linearised on load; lm_head is the embedding
        assert "model.transformer.h.0.attn.c_attn.weight" in names
        assert "model.lm_head.weight" not in names
    if name == "torch-encoder":  # the fused q/k/v of nn.MultiheadAttention is no Linear
        assert "enc.layers.0.self_attn.in_proj_weight" in names
    embeddings = {f"{n}.weight" for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Embedding)}
    assert names and not names & embeddings


@pytest.mark.parametrize("name", MODELS)
def test_dimap_modules_recognise_every_attention_layout(name):
    model, _ = build(name)
    names = list(prunable_weights(model))
    module_of = assign_modules(model, names, TRANSFORMER_MODULES)
    counts = {m: sum(1 for v in module_of.values() if v == m) for m in ("qkv", "proj", "mlp")}
    fused = name in ("gpt2", "torch-encoder")  # one q/k/v matrix per block
    assert counts == {"qkv": 2 if fused else 6, "proj": 2, "mlp": 4}
    # what no rule claims stays dense: patch embedding, classifier, language-model head
    assert all("classifier" not in n and "head" not in n.split(".")[-2] for n in module_of)


@pytest.mark.parametrize("name", MODELS)
def test_unstructured_dp_beats_uniform_data_free_on_user_models(name):
    """Xu et al.'s claim at small scale: at the same sparsity the DP allocation's output
    distortion is no worse than uniform's, data-free (token models get random valid ids)."""
    model, spec = build(name)
    x = spec.random(16, seed=0)
    with torch.no_grad():
        reference = model(x)
    results = {}
    for allocation in ("uniform", "lamp", "dp"):
        m, _ = build(name)
        config = UnstructuredConfig(sparsity=0.5, allocation=allocation, grid=11, refine=0,
                                    samples=16, additivity_samples=0)
        result = prune(m, config, example_input=x[:1], input_spec=spec)
        assert _sparsity(result.masks) == pytest.approx(0.5, abs=0.02)
        results[allocation] = _rel_mse(m, reference, x)
    assert np.isfinite(list(results.values())).all()
    assert results["dp"] <= results["uniform"] * 1.02, results


@pytest.mark.parametrize("name", ["bert", "vit", "torch-encoder"])
def test_dimap_global_prunes_each_module_to_the_same_fraction(name):
    model, spec = build(name)
    result = prune(model, UnstructuredConfig(sparsity=0.5, allocation="global", score="dimap"),
                   example_input=spec.random(1), input_spec=spec)
    module_of = assign_modules(model, list(prunable_weights(model)), TRANSFORMER_MODULES)
    for module in ("qkv", "proj", "mlp"):
        members = {n: result.masks[n] for n, m in module_of.items() if m == module}
        assert _sparsity(members) == pytest.approx(0.5, abs=0.01)


def test_unstructured_calibrated_distortion_on_bert():
    model, spec = build("bert")
    data = dataset(spec)
    config = UnstructuredConfig(sparsity=0.3, allocation="dp", distortion_data="calibration",
                                grid=11, refine=0, samples=16, additivity_samples=0)
    result = prune(model, config, data=data, example_input=data.x_train[:1], input_spec=spec)
    assert _sparsity(result.masks) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_channels_removes_whole_heads_and_ffn_channels(name, tmp_path):
    model, spec = build(name)
    x = spec.random(4)
    result = prune(model, ChannelConfig(ratio=0.5, allocation="uniform"), example_input=x[:1],
                   input_spec=spec)
    attentions = [m for m in model.modules() if getattr(m, "num_attention_heads", None)]
    assert attentions and all(a.num_attention_heads == 2 for a in attentions)
    shapes = result.metrics["layer_channels"]
    ffn = [v for k, v in shapes.items() if k.endswith(("intermediate.dense", "mlp.fc1"))]
    assert ffn and all(after == before // 2 for before, after in ffn)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    exported = export_model(model, x[:1], tmp_path / "pruned.onnx", ExportConfig(),
                            parity_inputs=spec.random(8, seed=3))
    assert exported.metrics["max_rel_diff"] < 1e-3


@pytest.mark.parametrize("name", ["gpt2", "torch-encoder"])
def test_channels_on_fused_attention_prunes_ffn_and_says_why_heads_stay(name):
    model, spec = build(name)
    result = prune(model, ChannelConfig(ratio=0.5, allocation="uniform"),
                   example_input=spec.random(1), input_spec=spec)
    shapes = result.metrics["layer_channels"]
    ffn = [v for k, v in shapes.items() if k.endswith(("mlp.c_fc", "linear1"))]
    assert ffn and all(after == before // 2 for before, after in ffn)
    assert result.metrics["heads"] == {}
    if name == "gpt2":
        reasons = " ".join(result.metrics["skipped"].values())
        assert "fused" in reasons


def test_nm_two_of_four_on_bert():
    model, spec = build("bert")
    result = prune(model, NMConfig(n=2, m=4), example_input=spec.random(1), input_spec=spec)
    for name, mask in result.masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), name


def test_nm_says_which_layer_cannot_be_grouped_on_vit():
    model, spec = build("vit")
    with pytest.raises(MethodError, match="patch_embeddings.projection.*on_indivisible"):
        prune(model, NMConfig(), example_input=spec.random(1), input_spec=spec)
    model, _ = build("vit")
    result = prune(model, NMConfig(on_indivisible="skip"), example_input=spec.random(1),
                   input_spec=spec)
    assert not any("patch_embeddings" in n for n in result.masks)


@pytest.mark.parametrize("name", MODELS)
def test_rtn_int8_export_matches_pytorch_on_user_models(name, tmp_path):
    model, spec = build(name)
    data = dataset(spec)
    result = quantize(model, RTNConfig(), data=data, example_input=data.x_train[:1],
                      input_spec=spec)
    assert result.metrics
    exported = export_model(model, data.x_train[:1], tmp_path / "int8.onnx",
                            ExportConfig(format="int8"), parity_inputs=data.x_test)
    metrics = exported.metrics
    assert metrics["int8_weights"] >= 4
    assert metrics["top1_agreement"] >= 0.98
    # attention's activation x activation products stay float, and the export says so
    assert "not quantized" in metrics["float_matmuls"]
    if name == "torch-encoder":  # MultiheadAttention bypasses out_proj's forward: left float
        assert not any("out_proj" in n for n in quantizable_modules(model))
        # fx keeps nn.TransformerEncoder whole; its FFN Linears still get int8 inputs, so they
        # run as integer kernels (input Linear + 2 layers x linear1/linear2), not as float
        # MatMuls on dequantized weights
        assert metrics["ort_int8_ops"]["com.microsoft.MatMulIntegerToFloat"] == 5


class PaddedEncoder(torch.nn.Module):
    """torch's TransformerEncoder as built by default (nested tensors on) with a padding mask:
    in eval it hands its layers NestedTensors."""

    def __init__(self, features: int = 8, width: int = 32, classes: int = 10):
        super().__init__()
        self.inp = torch.nn.Linear(features, width)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0,
                                                 batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        pad[:, -3:] = True
        return self.head(self.enc(self.inp(x), src_key_padding_mask=pad).mean(1))


def test_padded_torch_encoder_with_nested_tensors_quantizes_and_exports_int8(tmp_path):
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    spec = USER_MODELS["torch-encoder"][1]
    data = dataset(spec)
    quantize(model, RTNConfig(), data=data, example_input=data.x_train[:1], input_spec=spec)
    assert not model.enc.use_nested_tensor  # NestedTensors have no int8 grid, nor ONNX form
    exported = export_model(model, data.x_train[:1], tmp_path / "int8.onnx",
                            ExportConfig(format="int8"), parity_inputs=data.x_test)
    assert exported.metrics["top1_agreement"] >= 0.98
    assert exported.metrics["ort_int8_ops"]["com.microsoft.MatMulIntegerToFloat"] == 5


@pytest.mark.parametrize("config", [DataFreeConfig(), DFQConfig(), UDFCConfig()],
                         ids=["datafree", "dfq", "udfc"])
def test_batchnorm_data_free_quantizers_refuse_transformers_with_the_alternative(config):
    model, spec = build("bert")
    with pytest.raises(MethodError, match="has no BatchNorm.*LayerNorm.*quant.rtn"):
        quantize(model, config, example_input=spec.random(1), input_spec=spec)


def test_qat_on_bert_classifier_trains_and_exports_int8(tmp_path):
    torch.manual_seed(0)
    model = bert("sequence-classification", num_labels=4)
    data = dataset(TOKENS, classes=4)
    config = QATConfig(weight_bits=4, activation_bits=8, epochs=1, batch_size=32, skip=None,
                       calibration_samples=32)
    result = quantize(model, config, data=data, example_input=data.x_train[:1],
                      input_spec=TOKENS)
    assert result.metrics["weight_bits"] == 4
    exported = export_model(model, data.x_train[:1], tmp_path / "qat.onnx",
                            ExportConfig(format="int8"), parity_inputs=data.x_test)
    assert exported.metrics["top1_agreement"] >= 0.98


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_qkr_on_hf_attention_is_the_same_fp32_function(name):
    """OFQ's merged W_qᵀW_k form, through transformers' own attention call (padding mask
    included for BERT), with an identity quantizer: the model's outputs do not change."""
    from functools import partial

    from slimline.compress.quant.qat.qkr import attention_layout, hf_qkr_forward

    model, spec = build(name)
    x = spec.random(3)
    if name == "bert":
        x[0, -5:] = TOKENS.pad_id  # padded positions: the mask must reach the QKR logits
    with torch.no_grad():
        expected = model(x)
    rewritten = 0
    for module in model.modules():
        layout = attention_layout(module)
        if layout is not None:
            module.forward = partial(hf_qkr_forward, module, layout, lambda m: m, None)
            rewritten += 1
    assert rewritten == 2
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_qat_with_qkr_trains_a_bert_classifier_and_exports(tmp_path):
    model = bert("sequence-classification", num_labels=4)
    data = dataset(TOKENS, classes=4)
    config = QATConfig(weight_bits=4, activation_bits=8, epochs=2, batch_size=32, skip=None,
                       calibration_samples=32, qkr=True, cga=True, cga_epochs=1)
    result = quantize(model, config, data=data, example_input=data.x_train[:1],
                      input_spec=TOKENS)
    assert result.metrics["method"].endswith("+qkr")
    queries = [n for n, m in model.named_modules() if n.endswith("attention.self.query")]
    assert queries and all(f"{q}.weight" not in result.state.weights for q in queries)
    exported = export_model(model, data.x_train[:1], tmp_path / "qkr.onnx",
                            ExportConfig(format="int8"), parity_inputs=data.x_test)
    assert exported.metrics["top1_agreement"] >= 0.98


def test_qat_refuses_what_it_cannot_do_on_hf_models():
    data = dataset(TOKENS, classes=4)
    model, _ = build("gpt2")
    with pytest.raises(MethodError, match="qkr.*fused qkv.*qkr: false"):
        quantize(model, QATConfig(qkr=True, activation_bits=8, epochs=1), data=data,
                 input_spec=TOKENS)
    with pytest.raises(MethodError, match=r"\(batch, classes\) logits.*language model"):
        quantize(model, QATConfig(activation_bits=8, epochs=1, batch_size=32), data=data,
                 input_spec=TOKENS)


def test_bert_onnx_has_named_inputs_and_dynamic_batch_and_sequence(tmp_path):
    model, spec = build("bert")
    x = spec.random(2)
    exported = export_model(model, x[:1], tmp_path / "bert.onnx", ExportConfig(),
                            parity_inputs=spec.random(8, seed=2))
    proto = onnx.load(exported.path)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input}
    assert inputs == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    ids = spec.random(3, seed=5, seq_len=SEQ // 2 + 1)
    ids[0, -3:] = 0  # padding, masked out
    mask = (ids != 0).long()
    (out,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(ids, mask)
    assert out.shape == (3, 32)
    assert np.abs(out - expected.numpy()).max() < 1e-4


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_onnxruntime_baseline_quantizes_a_token_model(mode, tmp_path):
    """onnxruntime's own int8 (quantize_dynamic: the usual choice for transformers, and static
    QDQ calibrated on token ids) on the exported BERT, scored against fp32 by onnxruntime."""
    from slimline.export.int8_evaluation import compare_onnx_models
    from slimline.export.ort_quant import ort_quantize

    model, spec = build("bert", seed=1)
    ids = spec.random(48, seed=4)
    ids[:, -4:] = 0  # padded rows: the mask is derived from the recorded pad id
    fp32 = export_model(model, ids[:1], tmp_path / "fp32.onnx", ExportConfig(),
                        parity_inputs=ids[:8]).path
    int8 = ort_quantize(fp32, tmp_path / f"{mode}.onnx", mode=mode,
                        calibration=None if mode == "dynamic" else ids[:32].numpy())
    assert int8.stat().st_size < fp32.stat().st_size / 2
    scores = compare_onnx_models(fp32, int8, ids[32:].numpy())
    assert scores.max_rel_error < 0.1
    with torch.no_grad():
        padded = model(ids[32:])
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input_ids": ids[32:].numpy(),
                                "attention_mask": (ids[32:] != 0).long().numpy()})
    assert np.abs(out - padded.numpy()).max() < 1e-4


def test_qkr_refuses_attention_that_matches_a_layout_but_computes_more():
    """ALBERT's attention has BERT's q/k/v names but applies its output projection, residual
    and LayerNorm inside: the merged form would silently change it, so QKR refuses by name."""
    import transformers

    from slimline.compress.quant.qat.qkr import attention_layout, verify_qkr
    from slimline.models.hf import HFTextModel

    config = transformers.AlbertConfig(vocab_size=200, embedding_size=16, hidden_size=32,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64)
    model = HFTextModel(transformers.AlbertModel(config).eval(), "feature-extraction")
    attentions = {n: m for n, m in model.named_modules() if attention_layout(m) is not None}
    assert attentions  # the names match BERT's layout...
    with pytest.raises(ValueError, match="AlbertAttention.*does not compute plain softmax"):
        verify_qkr(model, attentions, {n: attention_layout(m) for n, m in attentions.items()},
                   TOKENS.random(2))
    bert_model, spec = build("bert")  # ...while BERT's own attention passes the same check
    found = {n: m for n, m in bert_model.named_modules() if attention_layout(m) is not None}
    verify_qkr(bert_model, found, {n: attention_layout(m) for n, m in found.items()},
               spec.random(2))
