"""One direction of imports (docs/architecture.md): a module imports only its own layer or lower
ones, lazy imports inside functions included.

    0  slimline.export, and the leaf utilities (io, registry, params, progress, versions, inputs)
    1  models, data, text_data, masks, evaluation, training, distillation, structure
    2  slimline.compress                                      (pruning, quantization)
    3  slimline.search                                        (architecture search, distillation)
    4  the pipeline: recipe, dag, stage(s), artifact, runner, report, api, cli, ...
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"slimline": "slimline", "compress": "slimline.compress", "search": "slimline.search",
           "export": "slimline.export"}
LEAVES = ("io", "registry", "params", "progress", "versions", "inputs")
CORE = ("models", "data", "text_data", "masks", "evaluation", "training", "distillation",
        "structure")


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "slimline":
        raise ValueError(module)
    if len(parts) == 1:
        return 0  # the package itself imports nothing eagerly (its public names are lazy)
    head = parts[1]
    if head == "export" or head in LEAVES:
        return 0
    if head in CORE:
        return 1
    return {"compress": 2, "search": 3}.get(head, 4)


def source_modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """Every slimline module ``module`` imports (absolute or relative), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    modules = source_modules()
    return [(name, line) for name, line in found
            if name.split(".")[0] == "slimline" and name in modules]


def _walk(tree: ast.AST) -> list[ast.AST]:
    """Nodes of ``tree`` outside ``if TYPE_CHECKING:`` blocks (type-only imports never run)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        todo += list(ast.iter_child_nodes(node))
    return nodes


def back_edges() -> list[str]:
    problems = []
    for module, path in sorted(source_modules().items()):
        own = layer_of(module)
        for target, line in imports_of(module, path):
            if layer_of(target) > own:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {own}) "
                                f"imports {target} (layer {layer_of(target)})")
    return problems


def test_no_module_imports_a_higher_layer():
    assert back_edges() == []


def test_no_source_uses_the_old_top_level_names():
    old = []
    for module, path in source_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            old += [f"{module}: {n}" for n in names if n.split(".")[0] in ("compress", "search",
                                                                           "export")]
    assert old == []


def test_the_check_sees_a_back_edge(tmp_path, monkeypatch):
    """The rule is not vacuous: a compress module importing the runner is reported."""
    fake = ROOT / "compress" / "_layering_probe.py"
    fake.write_text("def f():\n    from slimline.runner import run\n    return run\n")
    try:
        problems = back_edges()
    finally:
        fake.unlink()
    assert any("_layering_probe.py:2" in p and "slimline.runner (layer 4)" in p
               for p in problems), problems


@pytest.mark.parametrize(("module", "layer"), [
    ("slimline", 0), ("slimline.export.target", 0), ("slimline.io", 0), ("slimline.training", 1),
    ("slimline.compress.quant.rtn", 2), ("slimline.search.nas", 3), ("slimline.runner", 4),
    ("slimline.stages.quant", 4),
])
def test_layers(module, layer):
    assert layer_of(module) == layer
