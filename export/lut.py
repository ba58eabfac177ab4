"""Latency lookup table (LUT) for hardware-aware search: measure each distinct block once on the
target device, then predict a whole architecture as a sum (torch-free: onnx + onnxruntime).

Summing per-block session latencies naively counts onnxruntime's fixed per-``run`` cost
(Python -> C++ call, input/output binding, executor start) once per block instead of once per
network; for small models that cost is a large part of the total. So the table also times an
empty model (a single Identity), stores its median as ``overhead_ms``, keeps each block's
``median - overhead`` as its entry, and a prediction adds the overhead back once::

    predicted = overhead_ms + sum(entry.ms for each block of the architecture)

Known limit: a block timed alone has its weights hot in the core's L2 cache. A network whose
weights outgrow L2 (about 2 MiB per core on the project's box) streams them on every run, and
the sum then comes out low (by ~25% for the digits space's 3+ MiB architectures). A penalty
fitted on chains of one repeated block did not fix it (it over- or undershot by 2x depending on
which block was chained), so the table only records each block's ``weight_bytes``, and
:meth:`LatencyTable.weight_bytes` lets a search flag architectures past the cache size.

Timings use fixed threads (1 by default) and are interleaved: ``rounds`` passes over all
blocks, a few runs each, so a burst of load from other processes spreads over every block
instead of inflating a few. Each entry is the median of all its samples.

Blocks come as ONNX files listed in a ``manifest.json`` (written on a host with torch by
:func:`slimline.export.lut_blocks.export_space_blocks`), so the measuring side needs no torch:
``slimline profile lut BLOCKS_DIR -o lut.json`` (or ``python -m slimline.export lut ...``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from .graph import graph_summary
from .lut_manifest import (
    BlockFile,
    JsonTableFile,
    LutError,
    read_manifest,
    write_manifest,
    write_overhead_model,
)
from .machine import machine_info

__all__ = [
    "BlockFile",
    "BlockSessions",
    "LatencyTable",
    "LutEntry",
    "LutError",
    "interleaved_timings",
    "load_block_sessions",
    "measure_lut",
    "read_manifest",
    "write_manifest",
    "write_overhead_model",
]

LUT_FORMAT = "slimline-latency-lut"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LutEntry:
    """``ms``: the block's latency with the fixed per-run overhead removed (never below 0)."""

    key: str
    ms: float
    median_ms: float
    p90_ms: float
    runs: int
    spec: dict[str, Any] = field(default_factory=dict)
    weight_bytes: int = 0  # initializer bytes of the block's ONNX file


@dataclass
class LatencyTable(JsonTableFile):
    table_kind: ClassVar[str] = "latency table"
    entries: dict[str, LutEntry]
    overhead_ms: float
    batch_size: int
    threads: int
    machine: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # space, protocol, providers, time

    def predict(self, keys: Iterable[str]) -> float:
        """Predicted latency (ms) of a network made of the blocks ``keys`` (repeats count)."""
        return self.overhead_ms + sum(ms for _, ms in self.breakdown(keys))

    def weight_bytes(self, keys: Iterable[str]) -> int:
        """Total weight bytes of the blocks ``keys``: past the CPU's L2 size, expect the
        prediction to be low (see the module docstring)."""
        return sum(self.entries[k].weight_bytes for k, _ in self.breakdown(keys))

    def breakdown(self, keys: Iterable[str]) -> list[tuple[str, float]]:
        """``(key, ms)`` per block; raises :class:`LutError` listing blocks the table lacks."""
        keys = list(keys)
        missing = sorted({k for k in keys if k not in self.entries})
        if missing:
            shown = ", ".join(missing[:5]) + (
                f", ... ({len(missing)} in all)" if len(missing) > 5 else ""
            )
            raise LutError(
                f"the latency table has no entry for {shown}; it was built for space "
                f"{self.meta.get('space', {}).get('name', '?')!r}: rebuild it with "
                "`slimline profile lut SPACE.yaml` for this space"
            )
        return [(k, self.entries[k].ms) for k in keys]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LUT_FORMAT,
            "version": FORMAT_VERSION,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "overhead_ms": self.overhead_ms,
            "machine": self.machine,
            "meta": self.meta,
            "entries": {k: asdict(e) for k, e in sorted(self.entries.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "latency table") -> LatencyTable:
        if data.get("format") != LUT_FORMAT or data.get("version") != FORMAT_VERSION:
            raise LutError(
                f"{source} is not a slimline latency table (format {data.get('format')!r}, "
                f"version {data.get('version')!r}; expected {LUT_FORMAT!r} v{FORMAT_VERSION})"
            )
        try:
            entries = {k: LutEntry(**e) for k, e in data["entries"].items()}
            return cls(
                entries=entries,
                overhead_ms=float(data["overhead_ms"]),
                batch_size=int(data["batch_size"]),
                threads=int(data["threads"]),
                machine=dict(data.get("machine", {})),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError) as exc:
            raise LutError(f"{source}: malformed latency table ({exc})") from None



# --- measuring -------------------------------------------------------------------------------


def interleaved_timings(
    sessions: Sequence[ort.InferenceSession],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    warmup: int = 20,
    runs: int = 200,
    rounds: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """Per session, ``runs`` timings in ms, taken in ``rounds`` interleaved passes.

    Each pass starts at a different session (a rotation), and each session gets one untimed
    run per pass to bring its weights back into cache after the others ran.
    """
    if runs < 1 or rounds < 1 or warmup < 0:
        raise ValueError("runs and rounds must be >= 1 and warmup >= 0")
    rounds = min(rounds, runs)
    clock = time.perf_counter
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            session.run(None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    count = len(sessions)
    for r in range(rounds):
        per_round = runs // rounds + (1 if r < runs % rounds else 0)
        for step in range(count):
            index = (step + r * max(1, count // rounds)) % count
            run, feed = sessions[index].run, feeds[index]
            run(None, feed)
            for _ in range(per_round):
                start = clock()
                run(None, feed)
                samples[index].append((clock() - start) * 1000.0)
        if progress is not None:
            progress(r + 1, rounds)
    return samples


@dataclass
class BlockSessions:
    """One onnxruntime session and input per model of a blocks folder: the overhead model
    first, then the blocks (the order of ``sessions``/``feeds``)."""

    directory: Path
    overhead: BlockFile
    blocks: list[BlockFile]
    manifest: dict[str, Any]
    sessions: list[ort.InferenceSession]
    feeds: list[dict[str, np.ndarray]]
    threads: int

    def table(self, samples: Sequence[Sequence[float]], **protocol: Any) -> LatencyTable:
        """The lookup table from per-session timings (ms) in ``sessions`` order; ``protocol``
        (warmup, runs, rounds, ...) is recorded in its ``meta``."""
        if len(samples) != len(self.sessions):
            raise ValueError(f"expected {len(self.sessions)} timing lists, got {len(samples)}")
        overhead_ms = float(np.median(samples[0]))
        entries = {}
        for block, timings in zip(self.blocks, samples[1:], strict=True):
            median, p90 = (float(q) for q in np.percentile(timings, [50, 90]))
            entries[block.key] = LutEntry(
                key=block.key,
                ms=max(median - overhead_ms, 0.0),
                median_ms=median,
                p90_ms=p90,
                runs=len(timings),
                spec=block.spec,
                weight_bytes=graph_summary(self.directory / block.file).parameter_bytes,
            )
        meta = dict(self.manifest.get("meta", {}))
        meta |= dict(protocol) | {
            "providers": list(self.sessions[0].get_providers()),
            "overhead_p90_ms": float(np.percentile(samples[0], 90)),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return LatencyTable(
            entries=entries,
            overhead_ms=overhead_ms,
            batch_size=int(self.manifest["batch_size"]),
            threads=self.threads,
            machine=machine_info(),
            meta=meta,
        )


def load_block_sessions(
    directory: str | os.PathLike,
    *,
    threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> BlockSessions:
    """Sessions (fixed threads) and random inputs for every model of a blocks folder, each run
    once to prove it works.

    Raises:
        LutError: the folder has no valid manifest, or a model does not load or run.
    """
    directory = Path(directory)
    blocks, overhead, manifest = read_manifest(directory)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    sessions, feeds = [], []
    for item in [overhead, *blocks]:
        try:
            session = ort.InferenceSession(
                str(directory / item.file), sess_options=options, providers=list(providers)
            )
            name = session.get_inputs()[0].name
            feed = {name: rng.standard_normal(item.input_shape).astype(np.float32)}
            session.run(None, feed)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LutError(f"{directory / item.file} (block {item.key}): {first}") from exc
        sessions.append(session)
        feeds.append(feed)
    return BlockSessions(directory, overhead, blocks, manifest, sessions, feeds, threads)


def measure_lut(
    directory: str | os.PathLike,
    *,
    warmup: int = 20,
    runs: int = 300,
    rounds: int = 30,
    threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: Callable[[int, int], None] | None = None,
) -> LatencyTable:
    """Time every block of the blocks folder ``directory`` on this machine.

    Raises:
        LutError: the folder has no valid manifest, or a block file does not load/run.
    """
    loaded = load_block_sessions(directory, threads=threads, providers=providers)
    samples = interleaved_timings(
        loaded.sessions, loaded.feeds, warmup=warmup, runs=runs, rounds=rounds, progress=progress
    )
    return loaded.table(samples, warmup=warmup, runs=runs, rounds=rounds)
