"""A pruned transformers model written back as a checkpoint that transformers' own
``from_pretrained`` loads, and a clear refusal where no transformers config describes it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from slimline.compress.methods import prune  # noqa: E402
from slimline.compress.prune.channels import ChannelConfig  # noqa: E402
from slimline.compress.prune.unstructured import UnstructuredConfig  # noqa: E402
from slimline.models.hf import linearize_conv1d  # noqa: E402
from slimline.models.hf_save import HFSaveError, save_hf_pretrained  # noqa: E402
from tests.hf_models import build  # noqa: E402

FFN_FIELD = {"bert": "intermediate_size", "vit": "intermediate_size", "gpt2": "n_inner"}


def _reloaded_outputs(model, path, x):
    """The same slimline wrapper around ``type(inner).from_pretrained(path)``."""
    inner = model.model
    reloaded = type(inner).from_pretrained(path, local_files_only=True).eval()
    linearize_conv1d(reloaded)
    if getattr(inner, "pooler", "absent") is None:
        reloaded.pooler = None
    model.model = reloaded
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.model = inner


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_ffn_pruned_to_one_width_reloads_with_from_pretrained(name, tmp_path):
    model, spec = build(name)
    x = spec.random(4)
    before = getattr(model.model.config, FFN_FIELD[name]) or 4 * model.model.config.n_embd
    prune(model, ChannelConfig(ratio=0.5, allocation="uniform", prune_heads=False),
          example_input=x[:1], input_spec=spec)
    result = save_hf_pretrained(model, tmp_path / "hf", check_inputs=x)
    assert result["config_changes"] == {FFN_FIELD[name]: before // 2}
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(_reloaded_outputs(model, tmp_path / "hf", x), expected, atol=1e-6)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_unstructured_pruned_weights_are_what_is_saved(tmp_path):
    model, spec = build("bert")
    prune(model, UnstructuredConfig(sparsity=0.5, allocation="uniform"),
          example_input=spec.random(1), input_spec=spec)
    save_hf_pretrained(model, tmp_path / "hf", check_inputs=spec.random(4))
    from transformers import BertModel

    reloaded = BertModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    weight = reloaded.encoder.layer[0].intermediate.dense.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_removed_heads_are_zero_padded_back_to_the_same_function(name, tmp_path):
    """No transformers config has fewer heads of the same size; the checkpoint keeps the
    original shapes with the removed heads' q/k/v rows and output columns at zero."""
    model, spec = build(name)
    x = spec.random(4)
    prune(model, ChannelConfig(ratio=0.5, allocation="uniform"), example_input=x[:1],
          input_spec=spec)
    with pytest.raises(HFSaveError, match=r"heads were removed \(.*has 2 of 4\).*prune_heads: "
                                          "false"):
        save_hf_pretrained(model, tmp_path / "refused", pad=False)
    assert not (tmp_path / "refused").exists()
    result = save_hf_pretrained(model, tmp_path / "hf", check_inputs=x)
    assert result["config_changes"] == {} and result["zero_padded"]
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(_reloaded_outputs(model, tmp_path / "hf", x), expected, atol=1e-6)
    reloaded = type(model.model).from_pretrained(tmp_path / "hf", local_files_only=True)
    query = next(m for n, m in reloaded.named_modules() if n.endswith(("self.query", "q_proj")))
    assert int((query.weight.abs().sum(1) == 0).sum()) == query.weight.shape[0] // 2


def test_ffn_widths_that_differ_per_layer_are_zero_padded_or_refused(tmp_path):
    model, spec = build("bert")
    layers = model.model.encoder.layer
    with torch.no_grad():  # make layer 0's channels clearly weaker, so global takes more of it
        layers[0].intermediate.dense.weight.mul_(0.01)
    x = spec.random(4)
    prune(model, ChannelConfig(ratio=0.5, allocation="global", prune_heads=False),
          example_input=x[:1], input_spec=spec)
    widths = {layer.intermediate.dense.out_features for layer in layers}
    assert len(widths) == 2
    with pytest.raises(HFSaveError, match="widths seen.*allocation: uniform"):
        save_hf_pretrained(model, tmp_path / "refused", pad=False)
    result = save_hf_pretrained(model, tmp_path / "hf", check_inputs=x)
    assert result["max_abs_diff"] <= 1e-5 and result["zero_padded"]


def test_a_pruned_normalised_width_is_refused_even_with_padding(tmp_path):
    """Our pruners keep transformers' residual width (it is the model's output), but a
    user's own surgery may not: zeros inside a LayerNorm would change its statistics."""
    model, _ = build("bert")
    model.model.embeddings.LayerNorm = torch.nn.LayerNorm(24)
    with pytest.raises(HFSaveError, match="zero-padded back.*LayerNorm.*normalised width"):
        save_hf_pretrained(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_reload_that_differs_writes_nothing(tmp_path, monkeypatch):
    import slimline.models.hf_save as hf_save

    model, spec = build("bert")
    monkeypatch.setattr(hf_save, "_reload_diff", lambda *a: 0.5)
    with pytest.raises(HFSaveError, match="differs from the model by 0.5.*nothing was written"):
        save_hf_pretrained(model, tmp_path / "hf", check_inputs=spec.random(2))
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_weights_the_wrapper_dropped_come_from_the_source_checkpoint(tmp_path):
    """slimline's embedding wrapper drops BERT's (unused) pooler; the written checkpoint takes
    it from the checkpoint the model came from, not from a fresh initialisation."""
    import transformers

    from slimline.models.hf import build_hf_model
    from tests.hf_models import BERT

    config = transformers.BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"})
    source = transformers.BertModel(config)  # with its pooler
    source.save_pretrained(tmp_path / "source")
    model = build_hf_model({"hf": str(tmp_path / "source")})
    assert model.model.pooler is None
    result = save_hf_pretrained(model, tmp_path / "hf", source=tmp_path / "source")
    assert result["from_source"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert result["freshly_initialised"] == []
    from transformers import BertModel

    ours = BertModel.from_pretrained(tmp_path / "hf", local_files_only=True).pooler.dense.weight
    assert torch.equal(ours, source.pooler.dense.weight)


def test_a_plain_transformers_classifier_saves_and_is_checked_without_given_inputs(tmp_path):
    import transformers

    from tests.hf_models import BERT

    config = transformers.BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"},
                                     num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    result = save_hf_pretrained(model, tmp_path / "hf")  # random token ids check it
    assert result["max_abs_diff"] == 0.0 and result["config_changes"] == {}
