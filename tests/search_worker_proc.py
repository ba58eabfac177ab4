"""A search worker process for tests/test_search_workers.py and tests/test_study.py.

    python -m tests.search_worker_proc STORAGE STUDY MAX_TRIALS WORKER_ID LOG SLEEP

Its objective is cheap and deterministic: it suggests one integer ``x`` (a fresh random value
per fresh trial, the original's value for a retry), appends ``start`` to LOG, sleeps SLEEP
seconds (so a SIGKILL lands mid-trial) and appends ``end``. It prints its WorkerSummary as JSON.
:func:`start_worker`, :func:`finish`, :func:`kill_mid_trial` and :func:`check_study` drive it
from a test.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import optuna

from slimline.search.study import (
    ERROR_ATTR,
    OVER_CAP_ATTR,
    completed_trials,
    logical_number,
    open_study,
    run_worker,
)

ROOT = Path(__file__).parent.parent


def start_worker(storage: str, study: str, worker_id: str, log: Path,
                 max_trials: int, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.search_worker_proc", storage, study, str(max_trials),
         worker_id, str(log), str(sleep)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def evaluations(log: Path) -> list[tuple[str, int, int]]:
    """(worker, trial number, x) of every evaluation a worker started."""
    rows = [line.split() for line in log.read_text().splitlines() if line.startswith("start")]
    return [(w, int(n), int(x)) for _, w, n, x in rows]


def kill_mid_trial(proc: subprocess.Popen, log: Path, worker: str, nth: int,
                   timeout: float = 60) -> tuple[int, int]:
    """SIGKILL ``proc`` right after it starts its ``nth`` evaluation; its (trial, x)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [(n, x) for w, n, x in evaluations(log) if w == worker] if log.exists() else []
        if len(mine) >= nth:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return mine[nth - 1]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"worker {worker} never started trial #{nth}")


def check_study(study: optuna.Study, log: Path, cap: int, killed: tuple[int, int] | None) -> None:
    """The cap, one completion per logical trial, and no params evaluated twice but the retry."""
    done = completed_trials(study)
    assert len(done) == cap
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    per_logical = collections.Counter(logical_number(t) for t in complete)
    assert set(per_logical.values()) == {1}, per_logical  # no logical trial completed twice
    assert not any(t.user_attrs.get(OVER_CAP_ATTR) for t in complete)
    xs = collections.Counter(x for _, _, x in evaluations(log))
    twice = {x for x, count in xs.items() if count > 1}
    assert twice == ({killed[1]} if killed else set())
    assert {t.params["x"] for t in done} <= set(xs)
    if killed is not None:
        number, x = killed
        dead = study.trials[number]
        assert dead.state == optuna.trial.TrialState.FAIL and ERROR_ATTR not in dead.user_attrs
        (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
        assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == {"x": x}
        assert retry.user_attrs["worker_id"] != dead.user_attrs["worker_id"]


def main(argv: list[str]) -> None:
    storage, study_name, max_trials, worker_id, log, sleep = argv
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = zlib.crc32(worker_id.encode())  # each worker its own stream of params
    study = open_study(
        storage, study_name, directions=["minimize"],
        sampler=optuna.samplers.RandomSampler(seed=seed),
        default_journal=Path(log).with_suffix(".journal"), heartbeat_interval=1, grace_period=2,
        max_retry=2,
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_int("x", 0, 10**9)
        with open(log, "a") as handle:
            handle.write(f"start {worker_id} {trial.number} {x}\n")
        time.sleep(float(sleep))
        with open(log, "a") as handle:
            handle.write(f"end {worker_id} {trial.number} {x}\n")
        return (x % 1000) / 1000

    summary = run_worker(study, objective, max_trials=int(max_trials), worker_id=worker_id,
                         poll=0.2)
    print(json.dumps(dataclasses.asdict(summary)))


if __name__ == "__main__":
    main(sys.argv[1:])
