"""Packaging: one import name. The folders compress/, search/ and export/ stay at the top of the
repository and install as slimline.compress, slimline.search and slimline.export."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"slimline": "slimline", "compress": "slimline.compress", "search": "slimline.search",
           "export": "slimline.export"}


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _packages_on_disk()
    assert config["package-dir"] == {name: folder for folder, name in FOLDERS.items()}


@pytest.mark.slow
def test_the_wheel_installs_only_slimline(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("slimline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    roots = {name.split("/")[0] for name in names}
    assert {root for root in roots if not root.endswith(".dist-info")} == {"slimline"}
    for module in ("slimline/compress/quant/spec.py", "slimline/search/proxies/base.py",
                   "slimline/export/__main__.py", "slimline/export/target.py", "slimline/py.typed"):
        assert module in names
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["slimline"]


def test_installed_names_resolve_outside_the_checkout(tmp_path):
    """From another directory the old top-level names are gone and the new ones import."""
    script = ("import importlib.util as u, slimline.export, slimline.compress.quant, "
              "slimline.search.space, sys\n"
              "assert all(u.find_spec(n) is None for n in ('compress', 'search', 'export'))\n"
              "assert 'torch' not in sys.modules  # slimline.export alone stays torch-free\n")
    done = subprocess.run([sys.executable, "-c", script.replace(
        "slimline.compress.quant, slimline.search.space, ", "")], cwd=tmp_path,
        capture_output=True, text=True, timeout=120)  # torch-free: only slimline.export
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", "import slimline.compress.quant, "
                           "slimline.search.space"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
