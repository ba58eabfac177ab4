"""The blocks folder of a latency lookup table: ONNX files plus ``manifest.json``.

Written on a host with torch (:func:`slimline.export.lut_blocks.export_space_blocks`), read on the
device that times them (:func:`slimline.export.lut.measure_lut`); this module needs only onnx.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from .graph import atomic_write_bytes

__all__ = [
    "BlockFile",
    "LutError",
    "read_manifest",
    "write_manifest",
    "write_overhead_model",
]

MANIFEST_FORMAT = "slimline-lut-blocks"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


class LutError(ValueError):
    """A lookup table or blocks folder that cannot be used; the message says which and why."""


def write_json_file(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented, key-sorted JSON (atomically) and return the path."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json_table(path: Path, what: str) -> Any:
    """Parsed JSON of the table file ``path``; :class:`LutError` naming ``what`` (e.g.
    ``"latency table"``) if it cannot be read or parsed. A missing file raises
    :class:`FileNotFoundError` unchanged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise LutError(f"{path}: not a JSON {what} ({exc})") from None


class JsonTableFile:
    """``save``/``load`` for a table class with ``to_dict()`` and ``from_dict(data, source=)``;
    ``table_kind`` names it in errors (e.g. ``"latency table"``)."""

    table_kind = "table"

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_file(path, self.to_dict())  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        path = Path(path)
        data = read_json_table(path, cls.table_kind)
        return cls.from_dict(data, source=str(path))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class BlockFile:
    """One block to time: its LUT key, ONNX file (relative to the manifest) and input shape
    (batch included); ``spec`` describes the block for people (kind, channels, ...)."""

    key: str
    file: str
    input_shape: tuple[int, ...]
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"input_shape": list(self.input_shape)}


def write_manifest(
    directory: str | os.PathLike,
    blocks: Sequence[BlockFile],
    *,
    overhead: BlockFile,
    batch_size: int,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json`` listing ``blocks`` and the empty ``overhead`` model (files
    already in ``directory``)."""
    data = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "batch_size": batch_size,
        "overhead": overhead.to_dict(),
        "blocks": [b.to_dict() for b in blocks],
        "meta": dict(meta or {}),
    }
    return write_json_file(Path(directory) / MANIFEST_NAME, data)


def read_manifest(directory: str | os.PathLike) -> tuple[list[BlockFile], BlockFile, dict]:
    """``(blocks, overhead model, manifest)`` of a blocks folder; every file must exist."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise LutError(
            f"{directory} has no {MANIFEST_NAME}: give a search space YAML, or a folder written "
            "by `slimline profile lut SPACE.yaml --blocks-dir DIR --export-only`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise LutError(
                f"{path}: not a slimline blocks manifest (format {data.get('format')!r})"
            )

        def block(item: Mapping[str, Any]) -> BlockFile:
            return BlockFile(
                item["key"], item["file"], tuple(item["input_shape"]), item.get("spec", {})
            )

        blocks = [block(b) for b in data["blocks"]]
        overhead = block(data["overhead"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, LutError):
            raise
        raise LutError(f"{path}: malformed manifest ({exc})") from None
    missing = [b.file for b in [*blocks, overhead] if not (directory / b.file).is_file()]
    if missing:
        raise LutError(f"{directory}: files listed in {MANIFEST_NAME} are missing: {missing[:5]}")
    return blocks, overhead, data


def write_overhead_model(path: str | os.PathLike, input_shape: Sequence[int]) -> BlockFile:
    """The empty model (one Identity) whose latency is the fixed per-run overhead."""
    shape = list(input_shape)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "overhead",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what onnxruntime has long supported
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())
    return BlockFile("overhead", Path(path).name, tuple(shape), {"kind": "overhead"})
