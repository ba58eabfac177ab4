"""Wall time of the quickstart recipe per stage, from an empty run directory, then cached.

    python bench/bench_quickstart.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import slimline
from bench.common import markdown_table, save

RECIPE = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        first = slimline.run(RECIPE, run_dir=run_dir, progress=False)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        second = slimline.run(RECIPE, run_dir=run_dir, progress=False)
        warm = time.perf_counter() - started
    rows = [[r.id, r.uses, round(r.seconds, 2)] for r in first.records]
    rows += [["(total, in-process)", "", round(cold, 2)],
             ["(re-run, all cached)", "", round(warm, 2)]]
    accuracy = {r.id: r.metrics["accuracy"] for r in first.records if r.uses == "eval"}
    latency = {r.id: r.metrics["median_ms"] for r in first.records
               if r.uses == "profile.latency"}
    save("quickstart", {"stages": {r.id: r.seconds for r in first.records}, "cold_s": cold,
                        "cached_s": warm, "cached_ran": second.ran, "accuracy": accuracy,
                        "latency_ms": latency},
         "## Quickstart wall time (2 cores)\n\n" + markdown_table(["stage", "uses", "seconds"], rows))


if __name__ == "__main__":
    main()
