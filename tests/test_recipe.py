"""Recipe validation: every error names the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

import slimline
from slimline.recipe import RecipeError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

GOOD = """\
name: t
seed: 1
model: {name: mlp}
data: {name: digits}
stages:
  - id: train
    uses: train
    with:
      epochs: 2
  - id: prune
    uses: prune.magnitude
    with:
      sparsity: 0.5
"""


def _error(tmp_path: Path, text: str) -> RecipeError:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        slimline.validate(path)
    return info.value


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    plan = slimline.validate(path)
    assert plan.stages


def test_good_recipe_plans_in_order(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    plan = slimline.validate(path)
    assert [s.id for s in plan.stages] == ["train", "prune"]
    assert plan.get("prune").spec.needs == ["train"]  # default: the previous stage
    assert plan.get("prune").params.sparsity == 0.5


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("      epochs: 2", "      epochs: [2"))
    assert "malformed YAML" in str(err) and err.line is not None and err.line >= 9


def test_unknown_stage_suggests_closest(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("uses: prune.magnitude", "uses: prune.magnitud"))
    assert err.line == 11 and err.key == "stages[1].uses"
    assert "prune.magnitude" in str(err) and "Did you mean" in str(err)
    assert "recipe.yaml:11" in str(err)


def test_wrong_type_names_line_and_key(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("sparsity: 0.5", "sparsity: half"))
    assert err.line == 13 and err.key == "stages[1].with.sparsity"
    assert "expected a number" in str(err)


def test_out_of_range_value(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("sparsity: 0.5", "sparsity: 1.0"))
    assert err.line == 13 and "[0.0, 1.0)" in str(err)


def test_unknown_param_suggests(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("epochs: 2", "epoch: 2"))
    assert err.line == 9 and err.key == "stages[0].with.epoch" and "'epochs'" in str(err)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("seed: 1", "seeds: 1"))
    assert err.line == 2 and "did you mean 'seed'" in str(err)


def test_missing_needs_target(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("    uses: prune.magnitude",
                                        "    uses: prune.magnitude\n    needs: [trian]"))
    assert err.key == "stages[1].needs" and err.line == 12 and "'trian'" in str(err)


def test_cycle_is_reported_with_path(tmp_path: Path) -> None:
    text = GOOD.replace("    uses: train\n", "    uses: train\n    needs: [prune]\n")
    err = _error(tmp_path, text)
    assert "cycle" in str(err)
    assert "train -> prune -> train" in str(err) or "prune -> train -> prune" in str(err)


def test_duplicate_ids(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("id: prune", "id: train"))
    assert "duplicate" in str(err) and err.line == 10


def test_unknown_model_is_an_error_before_running(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["model"]["name"] = "resnett"
    with pytest.raises(RecipeError, match="Did you mean 'resnet'"):
        slimline.run(tiny_recipe, run_dir=tmp_path, dry_run=True)


def test_missing_required_top_level_key(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("data: {name: digits}\n", ""))
    assert "missing required key 'data'" in str(err)


def test_dict_recipe_validates(tiny_recipe) -> None:
    assert [s.id for s in slimline.validate(tiny_recipe).stages] == ["train", "prune", "eval"]


def test_eval_reference_must_exist(tiny_recipe) -> None:
    tiny_recipe["stages"][2]["with"] = {"reference": "nope"}
    with pytest.raises(RecipeError, match="unknown stage 'nope'"):
        slimline.validate(tiny_recipe)
