"""Shared output helpers for benchmark scripts: JSON + a markdown table, written atomically."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from slimline.io import write_json, write_text
from slimline.versions import versions

OUT = Path(__file__).parent / "out"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, data: dict[str, Any], markdown: str) -> None:
    """Write bench/out/<name>.json (with versions and command) and <name>.md; print the table."""
    data = {**data, "versions": versions(), "command": " ".join(["python", *sys.argv])}
    write_json(OUT / f"{name}.json", data)
    write_text(OUT / f"{name}.md", markdown + "\n")
    print(markdown)
