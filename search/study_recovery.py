"""Finding trials whose worker died and handing them back to live workers.

Optuna 5.0's ``JournalStorage`` has *no heartbeat* (it does not implement ``BaseHeartbeat``), so
a worker killed mid-trial would leave a RUNNING trial forever and the study would never reach
its cap; RDB storages have a heartbeat, but a worker still has to trigger the check and to cope
with finding its own trial failed under it. This module is that liveness side of
:mod:`slimline.search.study`, kept apart from the cap and worker loop it serves: with RDB storage
a dead worker's trial is failed by the heartbeat and retried by a live worker; for the journal
each trial records its worker's ``hostname`` and ``pid``, and a RUNNING trial whose process on
this host is gone is failed and retried the same way (under a file lock, so by one process).
Trials of other hosts sharing a journal file cannot be checked: use PostgreSQL across machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from slimline.search.study_storage import journal_path

__all__ = ["can_detect_deaths", "fail_dead_trials", "taken_over"]


def _heartbeat_enabled(study: optuna.Study) -> bool:
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _journal_lock(study: optuna.Study) -> Iterator[bool]:
    """An exclusive flock next to the journal file; yields False for non-journal storages."""
    path = journal_path(study._storage)
    if path is None:
        yield False
        return
    with open(f"{path}.slimline-orphans.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and retry trials whose worker died: heartbeat (RDB) or dead local process (journal).

    Returns the numbers of the trials failed by this call (RDB: always empty, Optuna does not
    report them). A journal trial is judged only once its current worker has registered itself
    (user attr ``trial`` equals its number), so a just-popped retry still carrying its dead
    predecessor's pid is left alone.
    """
    from slimline.search.study import max_retry_of  # deferred: that module imports this one

    if _heartbeat_enabled(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return []
    failed: list[int] = []
    host = socket.gethostname()
    with _journal_lock(study) as is_journal:
        if not is_journal:
            return failed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry_of(study))
        for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
            attrs = trial.user_attrs
            if attrs.get("trial") != trial.number or attrs.get("hostname") != host:
                continue
            if _pid_alive(int(attrs.get("pid", -1))):
                continue
            try:
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue
            failed.append(trial.number)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                retry(study, trial)
    return failed


def taken_over(study: optuna.Study, current: list[int]) -> bool:
    """Whether optimize() failed because the heartbeat had already failed our trial.

    Optuna then cannot tell the result (the trial is finished) and raises from inside
    ``_run_trial``; the trial was re-queued and another worker runs it, which is not an error.
    """
    from slimline.search.study import ERROR_ATTR, OVER_CAP_ATTR  # deferred: see above

    if not current:
        return False
    trial = study._storage.get_trial(current[0])
    return trial.state == TrialState.FAIL and not (
        trial.user_attrs.keys() & {ERROR_ATTR, OVER_CAP_ATTR}
    )


def can_detect_deaths(study: optuna.Study, host: str) -> bool:
    """Whether waiting here can end: every RUNNING trial is one whose worker's death we see."""
    if _heartbeat_enabled(study):
        return True
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return isinstance(study._storage, JournalStorage) and all(
        t.user_attrs.get("hostname") == host for t in running
    )
