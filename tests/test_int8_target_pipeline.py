"""The deployment target in recipes: validation, cache keys, and a run for this CPU and for the
other kind (exported here, checked here as far as this CPU can)."""

from __future__ import annotations

import pytest

import slimline
from slimline.cli import main
from slimline.export.machine import machine_info
from slimline.export.target import resolve_target, target_for_machine

HERE = target_for_machine(machine_info())
# The other kind of x86 CPU: what this machine computes differently (or not at all).
OTHER = "x86-vnni" if HERE.saturates_u8s8 else "x86-avx2"


def _int8_recipe(tiny_recipe: dict, target: str | None = None) -> dict:
    recipe = dict(tiny_recipe, name="int8-target")
    recipe["model"] = {"name": "resnet", "with": {"depth": 8, "width": 8}}
    recipe["stages"] = [
        {"id": "train", "uses": "train", "with": {"epochs": 2, "lr": 1e-2}},
        {"id": "quant", "uses": "quant.rtn", "with": {"calibration_samples": 128}},
        {"id": "export", "uses": "export.onnx", "with": {"format": "int8"}},
        {"id": "eval_onnx", "uses": "eval", "with": {"backend": "onnx"}},
        {"id": "export_fp32", "uses": "export.onnx", "needs": ["train"]},
        {"id": "ort", "uses": "export.ort_quantize", "with": {"calibration_samples": 64}},
    ]
    if target is not None:
        recipe["target"] = target
    return recipe


def test_an_unknown_target_is_a_recipe_error_with_a_suggestion(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nseed: 0\ntarget: x86-avx\nmodel: mlp\ndata: digits\n"
                    "stages:\n  - {id: train, uses: train}\n")
    with pytest.raises(slimline.RecipeError, match=r"r\.yaml:3: target: unknown target "
                                                   r"'x86-avx'; did you mean 'x86-avx2'"):
        slimline.validate(path)
    assert main(["run", str(path), "--dry-run"]) == 1
    assert main(["run", str(path), "--dry-run", "--target", "bogus"]) == 1  # --target checked too


def test_the_target_keys_quantization_and_export_but_not_training(tmp_path, tiny_recipe):
    def keys(target: str) -> dict[str, str]:
        result = slimline.run(_int8_recipe(tiny_recipe), run_dir=tmp_path, dry_run=True,
                              target=target)
        assert result.target.name == (HERE.name if target == "auto" else target)
        return {r.id: r.key for r in result.records}

    auto, here, other = keys("auto"), keys(HERE.name), keys(OTHER)
    assert auto == here  # auto is resolved before hashing
    assert other["train"] == here["train"] and other["export_fp32"] != here["export_fp32"]
    for stage in ("quant", "export", "eval_onnx", "ort"):
        assert other[stage] != here[stage], stage


def test_a_run_for_this_cpu_and_for_the_other_kind(tmp_path, tiny_recipe):
    here = slimline.run(_int8_recipe(tiny_recipe), run_dir=tmp_path, progress=False)
    reports = {"here": here.report_path.read_text()}  # one run dir: the next run rewrites it
    other = slimline.run(_int8_recipe(tiny_recipe, OTHER), run_dir=tmp_path, progress=False)
    reports["other"] = other.report_path.read_text()
    assert other.record("train").status == "cached"  # only target-aware work is redone
    for result, target, report in ((here, HERE, reports["here"]),
                                   (other, resolve_target(OTHER), reports["other"])):
        quant = result.record("quant").metrics
        assert quant["target"] == target.name and quant["int8_scheme"] == target.scheme.reason
        assert (quant["weight_bits_lowered"] > 0) == target.saturates_u8s8
        assert quant["weight_bits_used"] == ([7] if target.saturates_u8s8 else [8])
        export = result.record("export").metrics
        assert export["target"] == target.name and export["top1_agreement"] >= 0.98
        assert result.record("ort").metrics["reduce_range"] == target.saturates_u8s8
        assert f"Target: `{target.name}`" in report and target.scheme.reason in report
    # This CPU computes its own files exactly, and the other kind's when that one's weights fit.
    assert here.record("export").metrics["parity_backend"] == "onnxruntime"
    assert here.record("eval_onnx").metrics["backend"] == "onnx"
    exported_other = other.record("export").metrics
    if HERE.saturates_u8s8:  # full-range weights made for VNNI: checked on the reference path
        assert exported_other["parity_backend"].startswith("onnxruntime reference")
        assert "--verify-int8" in exported_other["note"]
        assert other.record("eval_onnx").metrics["backend"] == "onnx-reference"
        assert other.record("ort").metrics["scored_with"].startswith("onnxruntime reference")
    else:  # 7-bit weights made for AVX2 are exact on this VNNI/Arm CPU too
        assert exported_other["parity_backend"] == "onnxruntime"
    onnx_accuracy = other.record("eval_onnx").metrics["accuracy"]
    assert abs(onnx_accuracy - here.record("eval_onnx").metrics["accuracy"]) <= 0.02
