"""Export every distinct block of a search space to ONNX for the latency table (needs torch).

This is the host side of ``slimline profile lut``: it builds each block of a search space
(anything with the :class:`BlockSpace` methods, e.g. :class:`slimline.search.space.SearchSpace`,
which sits above this package) with PyTorch and writes one ONNX file per block
plus ``manifest.json`` into a folder. The folder can be copied to a device that has only
onnxruntime and measured there (:func:`slimline.export.lut.measure_lut`).

Blocks are exported with torch's TorchScript exporter, not :func:`export.export_onnx`'s
dynamo-first path: for a single block it produces the same ops (Conv with BatchNorm folded in,
Relu, Add, Gemm) in ~0.05 s instead of ~3 s, which matters for tables of hundreds of blocks.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import onnx
import torch

from .graph import atomic_write_bytes
from .lut import BlockFile, write_manifest, write_overhead_model

__all__ = ["BlockSpace", "export_block", "export_space_blocks"]


class BlockSpace(Protocol):
    """What :func:`export_space_blocks` needs of a search space."""

    in_channels: int
    input_size: Sequence[int]
    digest: str

    def distinct_blocks(self) -> Sequence[Any]: ...

    def build_block(self, block: Any) -> torch.nn.Module: ...

    def to_dict(self) -> dict[str, Any]: ...


def export_block(module: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """One block to a fixed-shape ONNX file (eval mode, BatchNorm folded), written atomically."""
    module = module.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            module,
            (torch.zeros(input_shape),),
            buffer,
            dynamo=False,
            opset_version=18,
            input_names=["input"],
            output_names=["output"],
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    return atomic_write_bytes(path, proto.SerializeToString())


def export_space_blocks(
    space: BlockSpace,
    directory: str | os.PathLike,
    *,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``block-NNN.onnx`` for each distinct block, ``overhead.onnx`` and the manifest
    into ``directory``; return the manifest's path."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # weights do not change timings, but the files should be reproducible
    blocks = space.distinct_blocks()
    files = []
    for index, block in enumerate(blocks):
        shape = (batch_size, block.in_channels, *block.input_size)
        name = f"block-{index:03d}.onnx"
        export_block(space.build_block(block), shape, directory / name)
        files.append(BlockFile(block.key, name, shape, block.to_dict()))
        if progress is not None:
            progress(index + 1, len(blocks))
    overhead = write_overhead_model(
        directory / "overhead.onnx", (batch_size, space.in_channels, *space.input_size)
    )
    meta = {"space": space.to_dict(), "space_digest": space.digest, "torch": torch.__version__}
    return write_manifest(directory, files, overhead=overhead, batch_size=batch_size, meta=meta)
