"""Rate-distortion DP solver time: numba kernel vs the pure-Python reference.

    python -m bench.bench_dp_solver                  # about 2 min on 2 cores (Python is slow)
    python -m bench.bench_dp_solver --python-budgets 1000

Problem: L layers x K levels (default 100 x 101), layer sizes drawn at random, level k keeps
``size * (1 - k / (K-1))`` cost units, distortion increasing and convex in the level; the budget
is half the dense cost, on a grid of ``budget`` units (10^3, 10^4, 10^5). Reported: numba's
one-time compile (in a fresh process with an empty cache, so the on-disk cache cannot hide it),
numba's median of 10 warm solves, one pure-Python solve, and a check that both find the same
optimum.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import markdown_table, save
from slimline.compress.prune.dp import allocate_dp, allocate_dp_reference


def problem(layers: int, levels: int, budget: int, seed: int = 0) -> tuple:
    """Random but realistic (distortion, cost, budget) with the dense model costing 2*budget."""
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(0.0, 1.0, layers)
    sizes = np.maximum(1, np.round(sizes / sizes.sum() * 2 * budget)).astype(np.int64)
    fraction = np.linspace(0.0, 1.0, levels)
    cost = np.round(sizes[:, None] * (1.0 - fraction[None, :])).astype(np.int64)
    sensitivity = rng.lognormal(0.0, 1.0, (layers, 1))
    distortion = sensitivity * (fraction[None, :] ** 2 + 0.01 * rng.random((layers, levels)))
    return distortion, cost, budget


def compile_seconds() -> tuple[float, float]:
    """(import, first call) seconds in a fresh interpreter with an empty numba cache: the first
    call is numba's type inference + LLVM compile of the kernel."""
    code = (
        "import time; t0 = time.perf_counter(); import numpy as np;"
        "from slimline.compress.prune.dp import allocate_dp; t1 = time.perf_counter();"
        "allocate_dp(np.zeros((2, 2)), np.ones((2, 2), np.int64), 2);"
        "print(t1 - t0, time.perf_counter() - t1)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    imported, compiled = out.stdout.strip().splitlines()[-1].split()
    return float(imported), float(compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--levels", type=int, default=101)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument(
        "--python-budgets",
        type=int,
        nargs="*",
        default=[1_000, 10_000],
        help="budgets also solved by the pure-Python reference",
    )
    args = parser.parse_args()

    import_s, compile_s = compile_seconds()
    allocate_dp(np.zeros((2, 2)), np.ones((2, 2), np.int64), 2)  # warm this process
    rows, results = [], []
    for budget in args.budgets:
        distortion, cost, budget = problem(args.layers, args.levels, budget)
        times = []
        for _ in range(10):
            started = time.perf_counter()
            choice = allocate_dp(distortion, cost, budget)
            times.append(time.perf_counter() - started)
        numba_ms = 1e3 * statistics.median(times)
        objective = float(distortion[np.arange(args.layers), choice].sum())
        python_ms, same = None, None
        if budget in args.python_budgets:
            started = time.perf_counter()
            reference = allocate_dp_reference(distortion, cost, budget)
            python_ms = 1e3 * (time.perf_counter() - started)
            same = bool(
                np.isclose(
                    distortion[np.arange(args.layers), reference].sum(), objective, rtol=1e-12
                )
            )
        used = int(cost[np.arange(args.layers), choice].sum())
        results.append(
            {
                "layers": args.layers,
                "levels": args.levels,
                "budget": budget,
                "numba_ms": numba_ms,
                "numba_ms_all": [1e3 * t for t in times],
                "python_ms": python_ms,
                "same_optimum": same,
                "cost_used": used,
            }
        )
        rows.append(
            [
                f"{args.layers} x {args.levels}",
                budget,
                round(numba_ms, 2),
                "–" if python_ms is None else round(python_ms),
                "–" if python_ms is None else f"{python_ms / numba_ms:.0f}x",
                "–" if same is None else same,
                f"{used} / {budget}",
            ]
        )
    table = markdown_table(
        [
            "layers x levels",
            "budget grid",
            "numba (ms, median of 10)",
            "pure Python (ms)",
            "speed-up",
            "same optimum",
            "cost used / budget",
        ],
        rows,
    )
    markdown = (
        f"## DP solver (numba vs pure Python)\n\n{table}\n\n"
        f"numba compile (first call in a fresh process, empty cache): {compile_s:.2f} s; "
        f"importing slimline.compress.prune.dp (torch, numba, numpy) before it: {import_s:.2f} s. Later "
        "processes load the kernel from numba's on-disk cache."
    )
    save("dp_solver", {"compile_s": compile_s, "import_s": import_s, "results": results}, markdown)


if __name__ == "__main__":
    main()
