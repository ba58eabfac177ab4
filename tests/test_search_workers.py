"""Distributed search workers on a real PostgreSQL server: a worker killed mid-trial.

The fixture starts a throwaway server (tests/pg_server.py: initdb, pg_ctl on a free loopback
port, trust auth) in a temporary directory; without PostgreSQL binaries the tests skip, saying
how to get them (.ci/run installs them).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from slimline.search.study import completed_trials, open_study
from tests.pg_server import postgres_bin, throwaway_postgres
from tests.search_worker_proc import check_study, finish, kill_mid_trial, start_worker

ROOT = Path(__file__).parent.parent
MAX_TRIALS = 8
SLEEP_S = 0.3


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (set SLIMLINE_TEST_POSTGRES_BIN or apt-get install "
                    "postgresql; .ci/run does this)")
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (in the dev extra)")
    with throwaway_postgres(bin_dir) as url:
        yield url


@pytest.mark.slow
def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(postgres_url: str,
                                                                 tmp_path: Path) -> None:
    log = tmp_path / "evals.log"
    study = open_study(postgres_url, "kill", directions=["minimize"], sampler=None,
                       default_journal=tmp_path / "unused.log", heartbeat_interval=1,
                       grace_period=2, max_retry=2)
    started = time.monotonic()
    victim = start_worker(postgres_url, "kill", "victim", log, MAX_TRIALS, SLEEP_S)
    survivor = start_worker(postgres_url, "kill", "survivor", log, MAX_TRIALS, SLEEP_S)
    killed = kill_mid_trial(victim, log, "victim", nth=2)
    summary = finish(survivor)
    assert summary["study_complete"] and summary["worker_id"] == "survivor"
    late = finish(start_worker(postgres_url, "kill", "late", log, MAX_TRIALS, SLEEP_S))
    assert late["completed"] == [] and late["over_cap"] == 0  # arrived after the cap: no work
    check_study(study, log, MAX_TRIALS, killed)
    for trial in completed_trials(study):
        assert trial.user_attrs["hostname"] == socket.gethostname()
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_two_workers_share_the_cap_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    log = tmp_path / "evals.log"
    procs = [start_worker(postgres_url, "share", f"w{i}", log, MAX_TRIALS, sleep=0.05)
             for i in range(2)]
    summaries = [finish(p) for p in procs]
    study = optuna.load_study(study_name="share", storage=postgres_url.replace(
        "postgresql://", "postgresql+psycopg://"))
    check_study(study, log, MAX_TRIALS, killed=None)
    assert sum(len(s["completed"]) for s in summaries) == MAX_TRIALS
