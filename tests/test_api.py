"""The Python API: one call per family, the stages' own config types, and the same results as
the recipe stages (so the two cannot drift)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import slimline
from slimline.compress.methods import MethodError
from slimline.data import load_dataset
from slimline.inputs import InputSpec
from slimline.io import sha256_text
from slimline.models import build_model
from slimline.search.nas_search import SearchFailed
from slimline.stage import get_stage
from tests.factories import TINY_SPACE

STAGE_CONFIGS = {
    "prune.magnitude": "MagnitudeConfig",
    "prune.unstructured": "UnstructuredConfig",
    "prune.channels": "ChannelConfig",
    "prune.nm": "NMConfig",
    "prune.plain_channels": "PlainChannelsConfig",
    "prune.neuron_merging": "NeuronMergingConfig",
    "prune.pdp": "PDPConfig",
    "quant.rtn": "RTNConfig",
    "quant.datafree": "DataFreeConfig",
    "quant.dfq": "DFQConfig",
    "compress.udfc": "UDFCConfig",
    "quant.qat": "QATConfig",
    "export.onnx": "ExportConfig",
    "export.ort_quantize": "OrtQuantizeConfig",
    "train": "TrainParams",
    "search.nas": "NasConfig",
}


@pytest.mark.parametrize(("stage", "config"), sorted(STAGE_CONFIGS.items()))
def test_each_stage_takes_the_public_config_as_its_schema(stage, config):
    assert get_stage(stage).params is getattr(slimline, config)


def test_distill_stage_schema_is_the_public_config_plus_the_teacher_reference():
    params = get_stage("distill").params
    assert issubclass(params, slimline.DistillConfig)
    assert get_stage("distill").stage_refs == ("teacher",)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = build_model("resnet", width=8)
    slimline.train(model, digits, slimline.TrainParams(epochs=1))
    return model


class Tripwire:
    """A dataset that fails the test when anything but its input description is read."""

    input_spec = InputSpec((1, 8, 8))

    def __getattr__(self, name):
        raise AssertionError(f"a data-free method read the dataset ({name})")


@pytest.mark.parametrize("config", [
    slimline.MagnitudeConfig(sparsity=0.5),
    slimline.UnstructuredConfig(sparsity=0.5, allocation="dp", grid=11, refine=0,
                                additivity_samples=0, bn_steps=20),
    slimline.NMConfig(exclude="^conv1"),
    slimline.ChannelConfig(ratio=0.3),
    slimline.NeuronMergingConfig(prune_ratio=0.3),
])
def test_data_free_pruners_run_through_the_api_without_reading_data(trained, config):
    model = copy.deepcopy(trained)
    result = slimline.prune(model, config, data=Tripwire(),
                            example_input=torch.randn(1, 1, 8, 8))
    assert result.model is model and result.record["method"]
    if "sparsity" in result.metrics:
        assert result.metrics["sparsity"] > 0.2
    else:
        assert sum(t.numel() for t in model.parameters()) < sum(
            t.numel() for t in trained.parameters())


def test_quantize_and_export_through_the_api(trained, digits, tmp_path):
    model = copy.deepcopy(trained)
    quantized = slimline.quantize(model, slimline.DataFreeConfig(), data=Tripwire(),
                                  target="portable", example_input=torch.randn(1, 1, 8, 8))
    assert quantized.metrics["target"] == "portable" and quantized.state.weights
    exported = slimline.export_model(model, digits.x_test[:2], tmp_path / "m.onnx",
                                     slimline.ExportConfig(format="int8"),
                                     parity_inputs=digits.x_test[:64], target="portable")
    assert exported.path.is_file() and exported.metrics["top1_agreement"] >= 0.98
    with pytest.raises(MethodError, match="already quantized"):
        slimline.quantize(model, slimline.RTNConfig(), data=digits)
    with pytest.raises(MethodError, match="pass data="):
        slimline.quantize(copy.deepcopy(trained), slimline.RTNConfig())
    with pytest.raises(TypeError, match="not a pruning config.*MagnitudeConfig"):
        slimline.prune(model, slimline.RTNConfig())


def test_the_api_and_the_stage_compute_the_same_thing(tmp_path, tiny_recipe, digits):
    config = {"sparsity": 0.6, "allocation": "dp", "grid": 21, "refine": 1,
              "additivity_samples": 0}
    tiny_recipe["stages"] = [tiny_recipe["stages"][0],
                             {"id": "prune", "uses": "prune.unstructured", "with": config}]
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    model = result.artifact("train").model
    stage_seed = int(sha256_text(f"{tiny_recipe['seed']}:prune")[:8], 16)
    direct = slimline.prune(model, slimline.UnstructuredConfig(**config), data=digits,
                            seed=stage_seed)
    staged = result.artifact("prune")
    assert set(direct.masks) == set(staged.masks)
    for name, mask in direct.masks.items():
        assert torch.equal(mask, staged.masks[name]), name
    assert direct.metrics["distortion"] == pytest.approx(
        result.record("prune").metrics["distortion"], rel=1e-6)


def test_nas_through_the_api_finds_what_the_stage_finds(tmp_path, tiny_recipe, digits):
    search = {"space": TINY_SPACE, "strategy": "tpe", "trials": 5, "latency": "none",
              "accuracy_proxy": "naswot", "proxies": ["naswot", "params"], "max_params": 6000}
    tiny_recipe["stages"] = [tiny_recipe["stages"][0],
                             {"id": "search", "uses": "search.nas", "needs": ["train"],
                              "with": search}]
    result = slimline.run(tiny_recipe, run_dir=tmp_path / "run", progress=False)
    teacher = result.artifact("train").model
    stage_seed = int(sha256_text(f"{tiny_recipe['seed']}:search")[:8], 16)
    found = slimline.nas(teacher, digits, slimline.NasConfig(**search), seed=stage_seed,
                         work_dir=tmp_path / "api")
    staged = result.record("search").metrics["search"]
    assert found.metrics["search"]["chosen"]["digest"] == staged["chosen"]["digest"]
    assert [c.digest for c in found.candidates] == [r["digest"] for r in json.loads(
        (result.record("search").directory / "search.json").read_text())["candidates"]]
    assert sum(t.numel() for t in found.model.parameters()) == found.metrics["search"][
        "chosen"]["params"] <= 6000
    assert found.files["search_md"].is_file() and found.work_dir == tmp_path / "api"
    with pytest.raises(SearchFailed, match="none of the 2 evaluated architectures meets"):
        slimline.nas(None, digits, slimline.NasConfig(**{**search, "trials": 2,
                                                         "max_params": 10}))
