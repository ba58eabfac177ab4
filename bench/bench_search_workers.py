"""Search throughput with 1 vs 2 worker processes sharing one study (PostgreSQL and journal).

Each trial picks an architecture of ``slimline.search.space.default_space()``, builds the CNN and scores
it with a gradient-norm proxy, repeating forward+backward passes on a random batch until the
trial has used ``--cost`` seconds of CPU (default 0.5 s: the cost of a training-free NAS proxy
evaluation), so every trial costs the same whatever the architecture. A zero-cost objective
measures the storage's own overhead per trial.

    nice -n 10 python -m bench.bench_search_workers            # bench/out/search_workers.*
    python -m bench.bench_search_workers --worker URL STUDY N ID COST   # one worker (internal)

Trials per minute = complete trials / (last completion - first start), read from the study,
so process start-up is excluded; ``wall_s`` includes it. ``cores used`` = the workers' CPU
seconds / wall seconds: on a shared machine it shows how much CPU the workers actually got.
The load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def proxy_objective(cost_s: float):  # noqa: ANN201 - an Optuna objective
    import torch

    from slimline.search.space import default_space

    torch.set_num_threads(1)
    space = default_space()

    def objective(trial) -> float:  # noqa: ANN001
        start = time.process_time()
        arch = space.validate(space.architecture_from_dict({
            "widths": [trial.suggest_categorical(f"w{i}", list(s.widths))
                       for i, s in enumerate(space.stages)],
            "depths": [trial.suggest_categorical(f"d{i}", list(s.depths))
                       for i, s in enumerate(space.stages)],
            "kernels": [trial.suggest_categorical(f"k{i}", list(s.kernels))
                        for i, s in enumerate(space.stages)],
        }))
        if cost_s <= 0:
            return 0.0
        torch.manual_seed(trial.number)
        model = space.build_model(arch)
        inputs = torch.randn(32, space.in_channels, *space.input_size)
        norm = 0.0
        while time.process_time() - start < cost_s:  # fixed CPU cost per trial
            model.zero_grad()
            model(inputs).logsumexp(dim=1).mean().backward()
            norm = float(sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None))
        return norm

    return objective


def worker_main(storage: str, study_name: str, max_trials: int, worker_id: str,
                cost_s: float) -> None:
    import optuna

    from slimline.search.study import open_study, run_worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, study_name, directions=["maximize"],
                       sampler=optuna.samplers.RandomSampler(seed=zlib.crc32(worker_id.encode())),
                       default_journal=Path(tempfile.gettempdir()) / "unused.log")
    summary = run_worker(study, proxy_objective(cost_s), max_trials=max_trials,
                         worker_id=worker_id)
    print(json.dumps(dataclasses.asdict(summary)))


def measure(storage: str, study_name: str, workers: int, trials: int, cost_s: float) -> dict:
    import optuna

    from slimline.search.study import completed_trials, open_study

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.bench_search_workers", "--worker",
                               storage, study_name, str(trials), f"w{i}", str(cost_s)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for i in range(workers)]
    summaries = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed with exit code {proc.returncode}")
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (cpu_after.ru_utime + cpu_after.ru_stime
                  - cpu_before.ru_utime - cpu_before.ru_stime)
    study = open_study(storage, study_name, directions=["maximize"], sampler=None,
                       default_journal=Path(tempfile.gettempdir()) / "unused.log")
    done = completed_trials(study)
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done))
    minutes = span.total_seconds() / 60
    all_trials = study.get_trials(deepcopy=False)
    return {
        "workers": workers, "trials": len(done), "cost_s": cost_s,
        "trials_per_min": len(done) / minutes, "span_s": span.total_seconds(), "wall_s": wall,
        "per_worker": [len(s["completed"]) for s in summaries],
        "worker_cpu_s": worker_cpu, "cores_used": worker_cpu / wall,
        "over_cap": sum(s["over_cap"] for s in summaries),
        "fail": sum(t.state == optuna.trial.TrialState.FAIL for t in all_trials),
    }


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    import optuna

    from bench.common import markdown_table, save
    from tests.pg_server import postgres_bin, throwaway_postgres

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--cost", type=float, default=0.5, help="CPU seconds per trial")
    args = parser.parse_args()
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL binaries: apt-get install postgresql")
    rows, results = [], []
    load_before = load()
    with throwaway_postgres(bin_dir, "slimline_bench") as pg, \
            tempfile.TemporaryDirectory() as tmp:
        storages = {"postgresql": pg, "journal": f"journal://{tmp}/bench.log"}
        for label, url in storages.items():
            for cost, workers in ((0.0, 1), (args.cost, 1), (args.cost, 2)):
                name = f"bench-{label}-{workers}-{cost}"
                result = {"storage": label, **measure(url, name, workers, args.trials, cost)}
                results.append(result)
                rows.append([label, workers, cost, result["trials"], result["trials_per_min"],
                             result["span_s"], result["wall_s"], result["cores_used"],
                             "/".join(map(str, result["per_worker"])), result["over_cap"]])
                print(rows[-1], flush=True)
    load_after = load()
    table = markdown_table(
        ["storage", "workers", "cpu s/trial", "complete", "trials/min", "span s", "wall s",
         "cores used", "per worker", "over-cap"], rows)
    note = (f"\n\nLoad average (1/5/15 min) before {load_before}, after {load_after}, on a "
            f"{os.cpu_count()}-core machine shared with other jobs.")
    save("search_workers", {"results": results, "load_before": load_before,
                            "load_after": load_after, "cpus": os.cpu_count()}, table + note)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, url_, study_, trials_, id_, cost_ = sys.argv
        worker_main(url_, study_, int(trials_), id_, float(cost_))
    else:
        main()
