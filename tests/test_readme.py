"""The README's two commands come first, and CI runs exactly the README's test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent.parent


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    end = lines.index("```", start + 1)
    assert start <= 3, "the two commands must open the README"
    return lines[start + 1 : end]


def test_readme_opens_with_install_and_test_commands() -> None:
    install_and_run, install_and_test = _readme_commands()
    for command in (install_and_run, install_and_test):
        assert "pip install torch==2.13.0" in command
        assert command.index("torch==2.13.0") < command.index("pip install -e")
    assert install_and_run.endswith("slimline run recipes/quickstart.yaml")
    assert "pytest" in install_and_test


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_every_registered_stage_is_documented() -> None:
    from slimline.stage import list_stages

    readme = (ROOT / "README.md").read_text()
    missing = [s.name for s in list_stages() if f"| `{s.name}` |" not in readme]
    assert not missing, f"stages missing from the README's table: {missing}"
