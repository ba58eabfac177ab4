"""Where a measurement was taken: CPU model, cores, int8-relevant ISA flags, versions."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["machine_info"]

# CPU features that decide int8 kernel speed; "asimddp" is Arm's dot product (SDOT/UDOT).
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


def machine_info() -> dict[str, Any]:
    """Where a measurement was taken: CPU, core counts, int8-relevant ISA flags, versions."""
    return dict(_machine_info())  # a copy: callers may annotate their report's dict


@functools.lru_cache(maxsize=1)
def _machine_info() -> dict[str, Any]:
    cpuinfo = _read_cpuinfo()
    cpu = next(
        (cpuinfo[k] for k in ("model name", "Hardware", "Processor") if cpuinfo.get(k)),
        platform.processor() or platform.machine(),
    )
    flags = set((cpuinfo.get("flags") or cpuinfo.get("Features") or "").split())
    try:
        available_cores: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        available_cores = os.cpu_count()
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        # What this process may use (containers, taskset); can be lower than logical_cores.
        "available_cores": available_cores,
        "isa_flags": [flag for flag in _ISA_FLAGS if flag in flags],
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _read_cpuinfo() -> dict[str, str]:
    """First value of each key in /proc/cpuinfo (all cores report the same model and flags)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in info:
                    info[key.strip()] = value.strip()
    except OSError:
        pass
    return info
