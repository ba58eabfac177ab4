"""The ``slimline`` command: listings, validation output and clean one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimline.cli import main


def test_stages_lists_every_builtin_with_a_doc(capsys) -> None:
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "eval", "prune.magnitude", "export.onnx", "profile.latency"):
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 10  # has a description


def test_stage_details_show_params(capsys) -> None:
    assert main(["stages", "prune.magnitude"]) == 0
    out = capsys.readouterr().out
    assert "sparsity" in out and "0.5" in out and "scope" in out


def test_unknown_stage_detail_is_clean_error(capsys) -> None:
    assert main(["stages", "prune.magnitud"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown stage") and "Traceback" not in err


def test_models_and_datasets(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet", "mobilenetv2", "vit", "mlp", "cnn1d", "gru"):
        assert any(line.startswith(name) for line in out.splitlines())
    assert main(["models", "resnet*"]) == 0
    assert "vit" not in capsys.readouterr().out
    assert main(["datasets"]) == 0
    assert "mnist1d" in capsys.readouterr().out


def test_validate_prints_plan(capsys) -> None:
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "prune.magnitude" in out and "sparsity=0.5" not in out.split()[0]


def test_invalid_recipe_exits_1_with_location(tmp_path: Path, tiny_recipe, capsys) -> None:
    tiny_recipe["stages"][1]["with"]["sparsity"] = "half"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe, sort_keys=False))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:" in err and "stages[1].with.sparsity" in err and "Traceback" not in err


def test_dry_run_shows_status_and_runs_nothing(tmp_path: Path, tiny_recipe, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe, sort_keys=False))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pending" in out and not (tmp_path / "run").exists()


def test_run_then_cached(tmp_path: Path, tiny_recipe, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe, sort_keys=False))
    args = ["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    assert "3 stage(s) ran" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 stage(s) ran, 3 cached" in capsys.readouterr().out


def test_factory_model(tmp_path: Path, tiny_recipe) -> None:
    import slimline

    tiny_recipe["model"] = {"factory": "tests.factories:tiny_net", "with": {"hidden": 8}}
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    assert result.artifact("eval").model[1].out_features == 8
    tiny_recipe["model"] = {"factory": "tests.factories:not_a_module"}
    with pytest.raises(slimline.RecipeError, match="not a torch.nn.Module"):
        slimline.run(tiny_recipe, run_dir=tmp_path / "b", dry_run=True)
