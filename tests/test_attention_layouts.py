"""Transformer proxies on every attention layout they claim: the zoo ``vit``, torch
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` and Hugging Face BERT, ViT and GPT-2
(tiny random-init models built from configs, never downloaded).

The attention maps the tap recomputes are checked against what each library itself returns
(``need_weights`` / ``output_attentions``), with padding and causal masks; the projection and
MLP weights the proxies read are checked by name; and one network written in two layouts must
score the same."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from slimline.models import build_model
from slimline.search.attention_sites import attention_sites
from slimline.search.features import attention_modules, tap
from slimline.search.proxies import ProxyError, ProxyInputs, get_proxy
from slimline.search.proxies.transformer import attention_projections, mlp_layers

TRANSFORMER_PROXIES = ("attention_confidence", "synaptic_diversity", "synaptic_saliency")


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def _names(model: nn.Module, modules) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in modules]


def _max_error(ours, theirs) -> float:
    assert len(ours) == len(theirs)
    return max(float((a - b).detach().abs().max()) for a, b in zip(ours, theirs))


class WithMask(nn.Module):
    """Calls a Hugging Face model with a fixed attention (padding) mask."""

    def __init__(self, model: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, x: torch.Tensor):
        return self.model(x, attention_mask=self.mask)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _padding_mask() -> torch.Tensor:
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return mask


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hugging_face_bert_attention_and_weights(hf, implementation):
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=16, num_labels=3,
                           attn_implementation=implementation)
    model = _no_dropout(hf.BertForSequenceClassification(config))
    ids, mask = torch.randint(1, 50, (4, 10)), _padding_mask()
    ours = tap(WithMask(model, mask), ids, attention=True).attention
    model.set_attn_implementation("eager")  # the reference: maps as BERT computes them
    theirs = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert _max_error(ours, theirs) < 1e-6
    assert [s.layout for s in attention_sites(model)] == ["separate"] * 2
    assert _names(model, mlp_layers(model)) == [
        f"bert.encoder.layer.{i}.{part}.dense" for i in range(2)
        for part in ("intermediate", "output")]
    # q, k, v and the attention output projection, which BERT keeps outside its self-attention.
    params = {id(p): n for n, p in model.named_parameters()}
    assert [params[id(v.parameter)] for v in attention_projections(model)][:4] == [
        f"bert.encoder.layer.0.attention.{part}.weight"
        for part in ("self.query", "self.key", "self.value", "output.dense")]


def test_hugging_face_vit_attention_and_proxies(hf):
    torch.manual_seed(0)
    config = hf.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16,
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                          num_labels=10, attn_implementation="eager")
    model = _no_dropout(hf.ViTForImageClassification(config))
    x = torch.randn(3, 1, 8, 8)
    ours = tap(model, x, attention=True).attention
    assert _max_error(ours, model(x, output_attentions=True).attentions) < 1e-6
    assert len(attention_projections(model)) == 8
    assert len(mlp_layers(model)) == 4 and model.classifier not in mlp_layers(model)
    inputs = ProxyInputs(x, torch.tensor([0, 1, 2]), 10)
    for name in TRANSFORMER_PROXIES:
        assert get_proxy(name).score(model, inputs) > 0


def test_hugging_face_gpt2_fused_conv1d(hf):
    torch.manual_seed(0)
    config = hf.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1, num_labels=3,
                           attn_implementation="eager")
    model = _no_dropout(hf.GPT2ForSequenceClassification(config))
    ids, mask = torch.randint(1, 50, (4, 10)), _padding_mask()
    ours = tap(WithMask(model, mask), ids, attention=True).attention
    theirs = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert _max_error(ours, theirs) < 1e-6
    assert torch.all(ours[0][0, :, 0, 1:] == 0)  # causal: the first token sees only itself
    assert _names(model, mlp_layers(model)) == [
        f"transformer.h.{i}.mlp.{part}" for i in range(2) for part in ("c_fc", "c_proj")]
    # Synaptic diversity splits the fused (in, 3 * out) c_attn weight into q, k and v.
    inputs = ProxyInputs(ids, torch.tensor([0, 1, 2, 0]), 3)
    score = get_proxy("synaptic_diversity").score(copy.deepcopy(model), inputs)
    model.zero_grad()
    nn.functional.cross_entropy(model(ids).logits, inputs.y).backward()
    expected = 0.0
    for block in model.transformer.h:
        w, g = block.attn.c_attn.weight, block.attn.c_attn.weight.grad
        chunks = [(w[:, i * 16:(i + 1) * 16], g[:, i * 16:(i + 1) * 16]) for i in range(3)]
        chunks.append((block.attn.c_proj.weight, block.attn.c_proj.weight.grad))
        expected += sum(float(torch.linalg.matrix_norm(a.detach(), "nuc")
                              * torch.linalg.matrix_norm(b, "nuc")) for a, b in chunks)
    assert score == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_multihead_attention_with_masks(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True  # torch's convention: True = ignore this key
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.head = attention, nn.Linear(16, 2)

        def forward(self, x):
            out, _ = self.attention(x, x, x, key_padding_mask=padding, attn_mask=causal)
            return self.head(out.mean(1 if batch_first else 0))

    (ours,) = tap(Model(), x, attention=True).attention
    _, theirs = attention(x, x, x, key_padding_mask=padding, attn_mask=causal,
                          average_attn_weights=False)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_torch_transformer_encoder_layers():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor notice
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.Sequential(encoder, nn.Flatten(), nn.Linear(16 * 6, 3))
    x = torch.randn(3, 6, 16)
    ours = tap(model.train(), x, attention=True).attention
    hidden, theirs = x, []
    for block in encoder.layers:
        theirs.append(block.self_attn(hidden, hidden, hidden, average_attn_weights=False)[1])
        hidden = block(hidden)
    assert _max_error(ours, theirs) < 1e-6
    assert _names(model, mlp_layers(model)) == [
        f"0.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    # Packed in_proj_weight: three (16, 16) views, plus out_proj.
    assert [tuple(v.value().shape) for v in attention_projections(model)] == [(16, 16)] * 8


class TorchAttention(nn.Module):
    """The zoo ViT's attention, rewritten as nn.MultiheadAttention with the same weights."""

    def __init__(self, zoo_attention: nn.Module):
        super().__init__()
        dim = zoo_attention.q.in_features
        self.mha = nn.MultiheadAttention(dim, zoo_attention.num_heads, batch_first=True)
        with torch.no_grad():
            self.mha.in_proj_weight.copy_(torch.cat(
                [zoo_attention.q.weight, zoo_attention.k.weight, zoo_attention.v.weight]))
            self.mha.in_proj_bias.copy_(torch.cat(
                [zoo_attention.q.bias, zoo_attention.k.bias, zoo_attention.v.bias]))
            self.mha.out_proj.load_state_dict(zoo_attention.proj.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def test_one_network_scores_the_same_in_the_zoo_and_the_torch_layout():
    torch.manual_seed(0)
    zoo = build_model("vit", depth=2, dim=16, heads=4)
    rewritten = copy.deepcopy(zoo)
    for block in rewritten.blocks:
        block.attn = TorchAttention(block.attn)
    x = torch.randn(6, 1, 8, 8)
    assert torch.allclose(zoo.eval()(x), rewritten.eval()(x), atol=1e-5)
    inputs = ProxyInputs(x, torch.arange(6), 10)
    for name in TRANSFORMER_PROXIES:
        ours, theirs = (get_proxy(name).score(copy.deepcopy(m), inputs) for m in (zoo, rewritten))
        assert ours == pytest.approx(theirs, rel=1e-4), name


def test_models_without_attention_are_refused_by_name():
    cnn = build_model("resnet_flex")
    assert attention_modules(cnn) == []
    inputs = ProxyInputs(torch.randn(4, 1, 8, 8), torch.arange(4), 10)
    with pytest.raises(ProxyError, match="'attention_confidence' cannot score FlexNet: .*"
                                         "nn.MultiheadAttention"):
        get_proxy("attention_confidence").score(cnn, inputs)
