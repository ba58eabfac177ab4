"""slimline.search.study: storage URLs, logical-trial counting, the global cap, and dead-worker retries.

Fast and in-process except one test with two real worker processes on the journal default;
the PostgreSQL kill test is in tests/test_search_workers.py.
"""

from __future__ import annotations

import collections
import copy
import datetime
import importlib.util
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

import slimline.search.study as study_mod
import slimline.search.study_recovery as study_recovery
from slimline.search.study import (
    ERROR_ATTR,
    OVER_CAP_ATTR,
    StudyStorageError,
    StudyTally,
    completed_trials,
    logical_number,
    open_study,
    run_worker,
    tally,
    wait_for_study,
)
from tests.search_worker_proc import (
    check_study,
    evaluations,
    finish,
    kill_mid_trial,
    start_worker,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _open(storage: str | None, tmp_path: Path, name: str = "s", **kw) -> optuna.Study:
    return open_study(storage, name, directions=["minimize"],
                      sampler=optuna.samplers.RandomSampler(seed=0),
                      default_journal=tmp_path / "default" / "study.log", **kw)


def _x(trial: optuna.Trial) -> float:
    return float(trial.suggest_int("x", 0, 10**9))


# --- storage URLs ------------------------------------------------------------------------------

def test_default_and_journal_urls_open_journal_files(tmp_path: Path) -> None:
    study = _open(None, tmp_path)
    assert isinstance(study._storage, JournalStorage)
    assert (tmp_path / "default" / "study.log").exists()  # the default is a journal, not SQLite
    run_worker(study, _x, max_trials=2)
    again = _open(f"journal://{tmp_path}/default/study.log", tmp_path)  # load_if_exists
    assert len(completed_trials(again)) == 2
    rel = tmp_path / "rel.log"
    assert isinstance(_open(str(rel), tmp_path)._storage, JournalStorage) and rel.exists()


def test_sqlite_url_gets_heartbeat_and_retry_callback(tmp_path: Path) -> None:
    study = _open(f"sqlite:///{tmp_path}/s.db", tmp_path, heartbeat_interval=3, grace_period=7,
                  max_retry=4)
    rdb = study._storage._backend  # the _CachedStorage wraps the RDBStorage
    assert isinstance(rdb, RDBStorage)
    assert (rdb.heartbeat_interval, rdb.grace_period) == (3, 7)
    callback = rdb.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, RetryHeartbeatStaleTrialCallback) and callback._max_retry == 4


@pytest.mark.parametrize(
    ("url", "needle"),
    [("redis://localhost/0", "unknown study storage"),
     ("journal://relative/x.log", "absolute path"),
     ("postgresql://me:s3cret@127.0.0.1:1/db", "cannot open study storage")],
)
def test_bad_storage_errors_are_clear_and_hide_passwords(tmp_path: Path, url: str,
                                                         needle: str) -> None:
    with pytest.raises(StudyStorageError, match=needle) as info:
        _open(url, tmp_path)
    assert "s3cret" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("pymysql") is not None, reason="PyMySQL installed")
def test_missing_driver_names_the_pip_package(tmp_path: Path) -> None:
    with pytest.raises(StudyStorageError, match=r"pip install PyMySQL"):
        _open("mysql+pymysql://u:pw@localhost/db", tmp_path)


def test_existing_study_with_other_directions_is_refused(tmp_path: Path) -> None:
    _open(None, tmp_path)
    with pytest.raises(ValueError, match=r"optimises \['minimize'\], not \['maximize'\]"):
        open_study(None, "s", directions=["maximize"], sampler=None,
                   default_journal=tmp_path / "default" / "study.log")


# --- logical trials ----------------------------------------------------------------------------

def _trial(number: int, state: TrialState, *, retry_of: list[int] | None = None,
           user: dict | None = None, age_s: float = 0.0) -> FrozenTrial:
    system = {"failed_trial": retry_of[0], "retry_history": retry_of} if retry_of else {}
    now = datetime.datetime.now() - datetime.timedelta(seconds=age_s)
    return FrozenTrial(
        number=number, state=state, value=1.0 if state == TrialState.COMPLETE else None,
        datetime_start=now, datetime_complete=now if state.is_finished() else None,
        params={"x": number}, distributions={"x": IntDistribution(0, 100)},
        user_attrs=user or {}, system_attrs=system, intermediate_values={}, trial_id=number,
    )


# max_retry = 2. Logical trial 3 was retried as 5 and 6 and has no retry left; 1 waits for its
# retry 4; 7 was just failed by the heartbeat (its retry is about to be added); 9 lost the race.
def _hand_built() -> list:
    """Built when called: a heartbeat FAIL's retry slot expires RETRY_DUE_WINDOW_S after its end
    time, so module-level trials would expire when the suite runs for more than a minute."""
    return [
        _trial(0, TrialState.COMPLETE),
        _trial(1, TrialState.FAIL),
        _trial(2, TrialState.FAIL, user={ERROR_ATTR: True}),
        _trial(3, TrialState.FAIL),
        _trial(4, TrialState.WAITING, retry_of=[1]),
        _trial(5, TrialState.FAIL, retry_of=[3]),
        _trial(6, TrialState.FAIL, retry_of=[3, 5]),
        _trial(7, TrialState.FAIL),
        _trial(8, TrialState.RUNNING),
        _trial(9, TrialState.PRUNED, user={OVER_CAP_ATTR: True}),
        _trial(10, TrialState.COMPLETE, retry_of=[8]),  # (a retry completing: same logical trial)
    ]


def test_tally_counts_logical_trials_by_hand() -> None:
    hand_built = _hand_built()
    result = tally(hand_built, max_retry=2)
    assert result.complete == {0, 8}
    assert result.live == {1, 7}
    assert result.failed == {2, 3}
    assert (result.waiting, result.running, result.committed) == (1, 1, 4)
    lower = tally(hand_built, max_retry=2, before=7)
    assert (lower.complete, lower.live, lower.failed) == ({0}, {1}, {2, 3})
    assert [logical_number(t) for t in hand_built] == [0, 1, 2, 3, 1, 3, 3, 7, 8, 9, 8]
    # A heartbeat FAIL whose retry never appeared (the failing process died) frees its slot.
    orphaned = _trial(7, TrialState.FAIL, age_s=study_mod.RETRY_DUE_WINDOW_S + 1)
    assert tally([orphaned], max_retry=2).failed == {7}


@pytest.mark.parametrize("max_retry", [0, 1, 2, 3])
def test_live_means_optunas_retry_callback_will_requeue(max_retry: int) -> None:
    """The slot kept for a heartbeat FAIL matches what RetryHeartbeatStaleTrialCallback does."""
    for failed in (_trial(1, TrialState.FAIL), _trial(5, TrialState.FAIL, retry_of=[1]),
                   _trial(6, TrialState.FAIL, retry_of=[1, 5])):
        study = optuna.create_study()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry)(study, copy.deepcopy(failed))
        requeued = len(study.get_trials(states=(TrialState.WAITING,))) == 1
        assert (1 in tally([failed], max_retry).live) == requeued


def test_completed_trials_dedups_retries_and_skips_over_cap(tmp_path: Path) -> None:
    study = _open(None, tmp_path)
    study.add_trial(optuna.create_trial(value=1.0, params={"x": 1},
                                        distributions={"x": IntDistribution(0, 9)}))
    study.add_trial(optuna.create_trial(
        value=2.0, params={"x": 1}, distributions={"x": IntDistribution(0, 9)},
        system_attrs={"failed_trial": 0, "retry_history": [0]}))
    study.add_trial(optuna.create_trial(value=3.0, user_attrs={OVER_CAP_ATTR: True}))
    assert [t.number for t in completed_trials(study)] == [0]


# --- the cap and dead workers ------------------------------------------------------------------

def test_trial_asked_past_the_cap_is_ended_unevaluated(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate losing a race: the pre-check sees free slots once, the post-ask check is real."""
    study = _open(None, tmp_path)
    run_worker(study, _x, max_trials=2)
    real_tally, fooled = study_mod.tally, []

    def stale_snapshot(trials, max_retry, *, before=None):  # noqa: ANN001, ANN202
        if before is None and not fooled:
            fooled.append(True)
            return StudyTally()
        return real_tally(trials, max_retry, before=before)

    monkeypatch.setattr(study_mod, "tally", stale_snapshot)
    calls: list[int] = []
    summary = run_worker(study, lambda t: calls.append(t.number) or 0.0, max_trials=2)
    assert calls == [] and summary.over_cap == 1 and summary.completed == []
    loser = study.trials[-1]
    assert loser.state == TrialState.PRUNED and loser.user_attrs[OVER_CAP_ATTR]
    assert loser.params == {}  # nothing suggested: samplers learn nothing from it
    assert len(completed_trials(study)) == 2


def test_objective_errors_fail_without_retry_and_are_raised(tmp_path: Path) -> None:
    study = _open(f"sqlite:///{tmp_path}/s.db", tmp_path, heartbeat_interval=1, max_retry=2)

    def broken(trial: optuna.Trial) -> float:
        raise ZeroDivisionError("bad objective")

    with pytest.raises(ZeroDivisionError):
        run_worker(study, broken, max_trials=3)
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL and trial.user_attrs[ERROR_ATTR]
    assert tally(study.trials, 2).failed == {0}  # not retried, its slot is free again
    with pytest.raises(RuntimeError, match="fix the objective"):
        run_worker(study, broken, max_trials=3, catch=(ZeroDivisionError,))
    assert len(study.trials) == 1 + 3


def test_stale_trial_is_failed_by_heartbeat_and_retried_with_its_params(tmp_path: Path) -> None:
    """A RUNNING trial whose worker stopped beating (as if SIGKILLed) is re-run by a live one."""
    study = _open(f"sqlite:///{tmp_path}/s.db", tmp_path, heartbeat_interval=1, grace_period=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zombie = study.ask()
    zombie_x = zombie.suggest_int("x", 0, 10**9)
    study._storage.record_heartbeat(zombie._trial_id)  # beat once, then "die"
    seen: list[int] = []
    progress: list[tuple[int, int]] = []
    summary = run_worker(study, lambda t: float(seen.append(_x(t)) or 0), max_trials=3,
                         progress=lambda done, total: progress.append((done, total)), poll=0.2)
    assert summary.study_complete and len(summary.completed) == 3
    assert study.trials[0].state == TrialState.FAIL
    retry = study.trials[3]
    assert logical_number(retry) == 0 and retry.params == {"x": zombie_x}
    assert seen.count(zombie_x) == 1 and len(set(seen)) == 3
    assert [logical_number(t) for t in completed_trials(study)] == [0, 1, 2]
    assert progress[-1] == (3, 3) and [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_worker_whose_trial_was_taken_over_moves_on(tmp_path: Path) -> None:
    """If the heartbeat failed and re-queued our trial while we still ran it (a stalled worker),
    our late result is refused by the storage and the worker just goes on; the retry counts."""
    study = _open(None, tmp_path, max_retry=2)
    calls: list[int] = []

    def stalled_once(trial: optuna.Trial) -> float:
        x = _x(trial)
        calls.append(trial.number)
        if len(calls) == 1:  # what another worker's fail_stale_trials does meanwhile
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback(2)(study, study._storage.get_trial(
                    trial._trial_id))
        return x

    summary = run_worker(study, stalled_once, max_trials=2)
    assert summary.taken_over == 1 and summary.study_complete
    assert study.trials[0].state == TrialState.FAIL
    assert [logical_number(t) for t in completed_trials(study)] == [0, 2]
    assert calls == [0, 1, 2]  # the retry (trial 1, logical 0), then a fresh trial 2


def test_journal_trial_of_a_dead_local_process_is_retried(tmp_path: Path) -> None:
    study = _open(None, tmp_path, max_retry=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask()
    orphan_x = orphan.suggest_int("x", 0, 10**9)
    for key, value in (("hostname", socket.gethostname()), ("pid", dead.pid), ("trial", 0)):
        orphan.set_user_attr(key, value)
    summary = run_worker(study, _x, max_trials=2, poll=0.1)
    assert summary.study_complete
    assert study.trials[0].state == TrialState.FAIL
    assert {logical_number(t): t.params["x"] for t in completed_trials(study)}[0] == orphan_x


def test_journal_worker_does_not_wait_forever_on_another_hosts_trial(tmp_path: Path) -> None:
    study = _open(None, tmp_path)
    other = study.ask()
    other.set_user_attr("hostname", "another-machine")
    summary = run_worker(study, _x, max_trials=2)
    assert len(summary.completed) == 1 and not summary.study_complete  # its share, then return
    with pytest.raises(TimeoutError, match=r"1/2 trials complete .*\(1 running"):
        wait_for_study(study, 2, timeout=0.3, poll=0.1)
    study.tell(other, 0.5)
    wait_for_study(study, 2, timeout=5, poll=0.1)


def test_two_worker_processes_share_the_cap_on_the_journal(tmp_path: Path) -> None:
    journal, log, cap = f"journal://{tmp_path}/study.log", tmp_path / "evals.log", 6
    procs = [start_worker(journal, "share", f"w{i}", log, cap, 0.05) for i in range(2)]
    summaries = [finish(p) for p in procs]
    study = _open(journal, tmp_path, name="share")
    done = completed_trials(study)
    assert len(done) == cap == sum(len(s["completed"]) for s in summaries)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == cap
    xs = collections.Counter(x for _, _, x in evaluations(log))
    assert max(xs.values()) == 1 and {t.params["x"] for t in done} == set(xs)
    assert {t.user_attrs["worker_id"] for t in done} <= {"w0", "w1"}


def test_worker_killed_mid_trial_on_the_journal_is_retried_by_the_survivor(tmp_path: Path) -> None:
    """No heartbeat in the journal: the survivor sees the victim's pid gone and re-runs it."""
    journal, log, cap = f"journal://{tmp_path}/study.log", tmp_path / "evals.log", 6
    victim = start_worker(journal, "kill", "victim", log, cap, 0.3)
    survivor = start_worker(journal, "kill", "survivor", log, cap, 0.3)
    killed = kill_mid_trial(victim, log, "victim", nth=2)
    assert finish(survivor)["study_complete"]
    check_study(_open(journal, tmp_path, name="kill"), log, cap, killed)


def test_zombie_process_counts_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert study_recovery._pid_alive(child.pid)
    child.kill()
    deadline = time.monotonic() + 10
    while study_recovery._pid_alive(child.pid) and time.monotonic() < deadline:  # until a zombie
        time.sleep(0.01)
    assert not study_recovery._pid_alive(child.pid)
    child.wait()
