"""Recipe parsing and validation: YAML (``safe_load`` semantics) -> a checked :class:`Recipe`.

Validation happens before any work runs, and every error names the file, the line and the key::

    recipes/quickstart.yaml:14: stages[2].with.sparsity: expected a number, got 'half'
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL_KEYS = ("name", "seed", "target", "model", "data", "stages", "description")
MODEL_KEYS = ("name", "factory", "hf", "hf_config", "task", "with", "checkpoint")
MODEL_SOURCES = ("name", "factory", "hf", "hf_config")
DATA_KEYS = ("name", "factory", "with")
STAGE_KEYS = ("id", "uses", "with", "needs", "description")
STAGE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class RecipeError(ValueError):
    """A recipe problem, located by file, line and key path."""

    def __init__(self, message: str, *, source: str = "<recipe>", line: int | None = None,
                 key: str | None = None):
        self.message, self.source, self.line, self.key = message, source, line, key
        location = source + (f":{line}" if line else "")
        super().__init__(f"{location}: {key + ': ' if key else ''}{message}")


@dataclass
class StageSpec:
    id: str
    uses: str
    params: dict[str, Any]
    needs: list[str]
    line: int | None = None


@dataclass
class Recipe:
    name: str
    seed: int
    model: dict[str, Any]
    data: dict[str, Any]
    stages: list[StageSpec]
    # The CPU the int8 files are for (slimline.export.target): "auto" is the machine that runs.
    target: str = "auto"
    source: str = "<recipe>"
    base_dir: Path = field(default_factory=Path.cwd)
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, key: str) -> int | None:
        """Line of ``key`` (e.g. ``stages[2].with.sparsity``), else of its closest parent."""
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key.rsplit(".", 1)[0] if "." in key else (key.split("[")[0] if "[" in key else "")
        return None

    def error(self, message: str, key: str | None = None) -> RecipeError:
        return RecipeError(message, source=self.source, line=self.line_of(key or ""), key=key)

    def stage(self, stage_id: str) -> StageSpec:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(stage_id)


def load_recipe(source: str | Path | dict[str, Any]) -> Recipe:
    """Parse and structurally validate a recipe file, YAML text already read, or a dict.

    Stage names and parameters are checked by :func:`slimline.dag.build_plan`, which needs the
    stage registry; this function checks the shape of the document itself.
    """
    if isinstance(source, dict):
        return _from_document(source, lines={}, name="<dict>", base_dir=Path.cwd())
    path = Path(source)
    if not path.exists():
        raise RecipeError("recipe file not found", source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe: {exc}", source=str(path)) from None
    document, lines = parse_yaml_with_lines(text, str(path))
    return _from_document(document, lines=lines, name=str(path), base_dir=path.parent.resolve())


def parse_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Safe-load YAML and map each key path (``stages[0].with.lr``) to its 1-based line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"malformed YAML: {problem}", source=source,
                          line=mark.line + 1 if mark else None) from None
    lines: dict[str, int] = {}
    if node is not None:
        _collect_lines(node, "", lines)
    return document, lines


def _collect_lines(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = f"{path}.{key_node.value}" if path else str(key_node.value)
            lines[child] = key_node.start_mark.line + 1
            _collect_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = f"{path}[{index}]"
            lines[child] = item.start_mark.line + 1
            _collect_lines(item, child, lines)


def _from_document(document: Any, *, lines: dict[str, int], name: str, base_dir: Path) -> Recipe:
    recipe = Recipe(name="", seed=0, model={}, data={}, stages=[], source=name, base_dir=base_dir,
                    lines=lines)
    if not isinstance(document, dict):
        raise recipe.error("a recipe must be a mapping with keys name, seed, model, data, stages")
    _check_keys(recipe, document, TOP_LEVEL_KEYS, "")
    for required in ("name", "model", "data", "stages"):
        if required not in document:
            raise recipe.error(f"missing required key {required!r}")
    recipe.name = _typed(recipe, document["name"], str, "name")
    if not re.match(r"^[A-Za-z0-9_.-]+$", recipe.name):
        raise recipe.error("use letters, digits, '.', '_' and '-' only (it names the run dir)",
                           "name")
    recipe.seed = _typed(recipe, document.get("seed", 0), int, "seed")
    recipe.target = check_target(recipe, _typed(recipe, document.get("target", "auto"), str,
                                                "target"))
    recipe.model = _section(recipe, document["model"], MODEL_KEYS, "model", MODEL_SOURCES)
    recipe.data = _section(recipe, document["data"], DATA_KEYS, "data")
    _check_hf(recipe)
    _resolve_data_paths(recipe, base_dir)
    if "checkpoint" in recipe.model and recipe.model["checkpoint"] is not None:
        checkpoint = Path(_typed(recipe, recipe.model["checkpoint"], str, "model.checkpoint"))
        recipe.model["checkpoint"] = str(checkpoint if checkpoint.is_absolute()
                                         else (base_dir / checkpoint))
    recipe.stages = _stages(recipe, document["stages"])
    return recipe


def check_target(recipe: Recipe, name: str, key: str = "target") -> str:
    """``name`` if it is ``auto`` or a known target (slimline.export.target), else an error."""
    from slimline.export.target import TARGETS

    known = ["auto", *TARGETS]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise recipe.error(f"unknown target {name!r}{hint} (known: {', '.join(known)})", key)
    return name


def _check_hf(recipe: Recipe) -> None:
    """``task`` belongs to Hugging Face models; ``hf`` paths are relative to the recipe."""
    model = recipe.model
    if "task" in model and not ({"hf", "hf_config"} & set(model)):
        raise recipe.error("'task' applies to Hugging Face models ('hf' or 'hf_config')",
                           "model.task")
    if "hf" in model or "hf_config" in model:
        from slimline.models.hf import TASKS

        task = model.setdefault("task", "feature-extraction")
        if task not in TASKS:
            close = difflib.get_close_matches(str(task), TASKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise recipe.error(f"unknown task {task!r}{hint} (known: {', '.join(TASKS)})",
                               "model.task")
        if "hf_config" in model and not isinstance(model["hf_config"], dict):
            raise recipe.error("expected a mapping of transformers config fields", "model.hf_config")
        if "hf" in model and not model["hf"].startswith("pkg://"):
            path = Path(model["hf"]).expanduser()
            model["hf"] = str(path if path.is_absolute() else recipe.base_dir / path)


def _resolve_data_paths(recipe: Recipe, base_dir: Path) -> None:
    """Relative file arguments of the dataset (``path``, ``tokenizer``) name files beside the
    recipe, not in whatever directory the run was started from."""
    params = recipe.data["with"]
    for key in ("path", "tokenizer"):
        value = params.get(key)
        if isinstance(value, str) and not value.startswith("pkg://"):
            path = Path(value).expanduser()
            if not path.is_absolute() and (base_dir / path).exists():
                params[key] = str(base_dir / path)


def _check_keys(recipe: Recipe, mapping: dict, allowed: tuple[str, ...], path: str) -> None:
    for key in mapping:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise recipe.error(f"unknown key{hint} (allowed: {', '.join(allowed)})", where)


def _typed(recipe: Recipe, value: Any, kind: type, key: str) -> Any:
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise recipe.error(f"expected {kind.__name__}, got {value!r}", key)
    return value


def _section(recipe: Recipe, value: Any, allowed: tuple[str, ...], key: str,
             sources: tuple[str, ...] = ("name", "factory")) -> dict[str, Any]:
    if isinstance(value, str):  # shorthand: `model: resnet`
        value = {"name": value}
    if not isinstance(value, dict):
        raise recipe.error("expected a mapping (or a registered name)", key)
    _check_keys(recipe, value, allowed, key)
    if sum(source in value for source in sources) != 1:
        extra = (", 'hf' (a local transformers checkpoint: a directory or pkg://package/dir) "
                 "or 'hf_config' (a transformers config: random init)" if "hf" in sources else "")
        raise recipe.error("give exactly one of 'name' (registered) or 'factory' "
                           f"('package.module:function', runs that code){extra}", key)
    for text_key in ("name", "factory", "hf"):
        if text_key in value:
            _typed(recipe, value[text_key], str, f"{key}.{text_key}")
    params = value.get("with") or {}
    if not isinstance(params, dict):
        raise recipe.error("expected a mapping of parameters", f"{key}.with")
    return {**value, "with": dict(params)}


def _stages(recipe: Recipe, value: Any) -> list[StageSpec]:
    if not isinstance(value, list) or not value:
        raise recipe.error("expected a non-empty list of stages", "stages")
    stages: list[StageSpec] = []
    seen: set[str] = set()
    for index, raw in enumerate(value):
        key = f"stages[{index}]"
        if not isinstance(raw, dict):
            raise recipe.error("a stage must be a mapping with 'id' and 'uses'", key)
        _check_keys(recipe, raw, STAGE_KEYS, key)
        for required in ("id", "uses"):
            if required not in raw:
                raise recipe.error(f"missing required key {required!r}", key)
        stage_id = _typed(recipe, raw["id"], str, f"{key}.id")
        if not STAGE_ID.match(stage_id):
            raise recipe.error("stage ids use letters, digits, '_', '.', '-'", f"{key}.id")
        if stage_id in seen:
            raise recipe.error(f"duplicate stage id {stage_id!r}", f"{key}.id")
        seen.add(stage_id)
        uses = _typed(recipe, raw["uses"], str, f"{key}.uses")
        params = raw.get("with") or {}
        if not isinstance(params, dict):
            raise recipe.error("expected a mapping of parameters", f"{key}.with")
        if "needs" in raw:
            needs = raw["needs"]
            needs = [needs] if isinstance(needs, str) else needs
            if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
                raise recipe.error("expected a stage id or a list of stage ids", f"{key}.needs")
        else:  # default: the previous stage (the first stage starts from the model)
            needs = [stages[-1].id] if stages else []
        stages.append(StageSpec(stage_id, uses, dict(params), list(needs),
                                recipe.lines.get(key)))
    return stages
