"""Optuna study storage and distributed search workers with a global trial cap.

One search is one Optuna study shared by any number of worker processes through a storage URL:

* ``None`` (the one-machine default): a journal file (``JournalFileBackend``) at
  ``default_journal``; ``journal:///abs/path.log`` or a path ending in ``.log``: that file.
* ``postgresql://``, ``mysql://``, ``sqlite:///``: ``RDBStorage`` with a heartbeat. A worker that
  dies mid-trial stops beating; after ``grace_period`` s the next worker to look fails the trial
  and re-queues it (same params) as a WAITING trial naming the original in its system attrs.

**Logical trials.** A retry is the same logical trial as the one it replaces
(:func:`logical_number`); "``max_trials`` trials" means that many COMPLETE logical trials.

**The cap without overshoot.** The storage numbers trials atomically, so every worker agrees on
their creation order. A worker asks only while fewer than ``max_trials`` logical trials are
complete or live (RUNNING, WAITING, or just failed by the heartbeat with a retry due). Racing
workers can still ask together, so after ``ask`` a fresh trial is admitted only if fewer than
``max_trials`` logical trials with a *smaller* number are complete or live: lower numbers win.
A loser ends at once as PRUNED with user attr ``slimline_over_cap``, before the objective
suggests anything (no params, no compute, nothing for samplers to learn), and every count here
ignores it. A retry keeps its slot. An undecided lower trial counts as live, so the check can
only under-admit, and the worker then asks again.

**A killed worker.** Its trial is failed and retried by a live worker (the heartbeat with RDB
storage; a dead-process check with the journal, which has no heartbeat:
:mod:`slimline.search.study_recovery`). A worker with nothing left to ask polls until the study
is done, so the last survivor finishes a dead worker's share.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimline.search.study_recovery import can_detect_deaths, fail_dead_trials, taken_over
from slimline.search.study_storage import StudyStorageError, journal_path, open_storage, redact

__all__ = [
    "StudyStorageError",
    "StudyTally",
    "WorkerSummary",
    "completed_trials",
    "logical_number",
    "open_study",
    "run_worker",
    "tally",
    "wait_for_study",
]

OVER_CAP_ATTR = "slimline_over_cap"
ERROR_ATTR = "slimline_error"
MAX_RETRY_ATTR = "slimline_max_retry"  # study user attr, so every worker counts retries alike
# A heartbeat FAIL keeps its slot this long while its retry is being added (see _retry_due).
RETRY_DUE_WINDOW_S = 60.0

Objective = Callable[[optuna.Trial], "float | Sequence[float]"]


def open_study(
    storage: str | None,
    study_name: str,
    *,
    directions: Sequence[str],
    sampler: optuna.samplers.BaseSampler | None,
    default_journal: Path,
    heartbeat_interval: int = 10,
    grace_period: int = 30,
    max_retry: int = 2,
) -> optuna.Study:
    """Create or load (``load_if_exists``) the study ``study_name`` in ``storage``.

    ``storage`` forms are listed in the module docstring. ``heartbeat_interval``,
    ``grace_period`` (seconds) and ``max_retry`` (re-runs of one logical trial after its worker
    died) apply to RDB storages; ``max_retry`` also to the journal's dead-process check. Give
    each worker its own sampler seed, or two workers will propose the same params.

    Raises :class:`StudyStorageError` for an unknown scheme, a missing driver (naming the pip
    package) or an unreachable server, and :class:`ValueError` if an existing study of that name
    optimises different directions.
    """
    backend = open_storage(storage, default_journal=default_journal,
                           heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                           max_retry=max_retry)
    study = optuna.create_study(
        storage=backend, study_name=study_name, sampler=sampler, directions=list(directions),
        load_if_exists=True,
    )
    wanted = [d.lower() for d in directions]
    found = [d.name.lower() for d in study.directions]
    if found != wanted:
        raise ValueError(
            f"study {study_name!r} in {redact(storage or str(default_journal))} optimises "
            f"{found}, not {wanted}; use another study name or storage"
        )
    if study.user_attrs.get(MAX_RETRY_ATTR) != max_retry:
        study.set_user_attr(MAX_RETRY_ATTR, max_retry)
    return study


def logical_number(trial: FrozenTrial) -> int:
    """The number of the original trial that ``trial`` retries, or its own number."""
    original = trial.system_attrs.get("failed_trial")  # what retried_trial_number() reads
    return trial.number if original is None else int(original)


@dataclass
class StudyTally:
    """The study seen as logical trials (over-cap trials left out)."""

    complete: set[int] = field(default_factory=set)
    live: set[int] = field(default_factory=set)  # running, waiting or about to be retried
    failed: set[int] = field(default_factory=set)  # finished without a result, no retry left
    waiting: int = 0  # WAITING trials (retries nobody has picked up yet)
    running: int = 0

    @property
    def committed(self) -> int:
        """Logical trials that hold a slot under the cap."""
        return len(self.complete) + len(self.live)


def _retry_due(trial: FrozenTrial, max_retry: int, now: datetime.datetime) -> bool:
    """A FAIL from the heartbeat (not the objective) with retries left, failed moments ago.

    Counting it live closes the window between the heartbeat failing a trial and the retry
    callback adding its WAITING copy, in which a new trial could take the slot. The callback
    runs right after, in the same call; if its process died in between, the slot is freed after
    ``RETRY_DUE_WINDOW_S`` instead of being held forever.
    """
    if ERROR_ATTR in trial.user_attrs or trial.datetime_complete is None:
        return False
    if len(trial.system_attrs.get("retry_history", [])) >= max_retry:
        return False  # RetryHeartbeatStaleTrialCallback stops at max_retry re-runs
    ended = trial.datetime_complete
    current = now.astimezone(ended.tzinfo) if ended.tzinfo else now.replace(tzinfo=None)
    return (current - ended).total_seconds() < RETRY_DUE_WINDOW_S


def tally(trials: Sequence[FrozenTrial], max_retry: int, *, before: int | None = None,
          now: datetime.datetime | None = None) -> StudyTally:
    """Classify ``trials`` by logical trial; with ``before``, only logical numbers < ``before``.

    ``now`` (default: the local time) dates heartbeat failures whose retry is due.
    """
    now = now or datetime.datetime.now().astimezone()
    members: dict[int, list[FrozenTrial]] = {}
    for trial in trials:
        if trial.user_attrs.get(OVER_CAP_ATTR):
            continue
        key = logical_number(trial)
        if before is None or key < before:
            members.setdefault(key, []).append(trial)
    result = StudyTally()
    for key, group in members.items():
        group.sort(key=lambda t: t.number)
        states = {t.state for t in group}
        result.waiting += sum(t.state == TrialState.WAITING for t in group)
        result.running += sum(t.state == TrialState.RUNNING for t in group)
        latest = group[-1]
        if TrialState.COMPLETE in states:
            result.complete.add(key)
        elif states & {TrialState.RUNNING, TrialState.WAITING} or (
            latest.state == TrialState.FAIL and _retry_due(latest, max_retry, now)
        ):
            result.live.add(key)
        else:
            result.failed.add(key)
    return result


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """One COMPLETE trial per logical trial, in logical-number order (retries deduplicated)."""
    best: dict[int, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not trial.user_attrs.get(OVER_CAP_ATTR):
            best.setdefault(logical_number(trial), trial)
    return [best[k] for k in sorted(best)]


@dataclass
class WorkerSummary:
    """What one :func:`run_worker` call did."""

    worker_id: str
    completed: list[int] = field(default_factory=list)  # trial numbers this worker completed
    failed: list[int] = field(default_factory=list)  # objective raised (and was caught)
    over_cap: int = 0  # trials asked past the cap and ended unevaluated
    taken_over: int = 0  # trials failed by the heartbeat while this worker was still on them
    study_complete: bool = False  # the study held max_trials complete logical trials at exit
    elapsed_s: float = 0.0


class _OverCap(optuna.TrialPruned):
    """Raised inside the objective wrapper when the just-asked trial lost the race for a slot."""


def max_retry_of(study: optuna.Study) -> int:
    """Re-runs allowed per logical trial, as the study records it (:func:`open_study`)."""
    return int(study.user_attrs.get(MAX_RETRY_ATTR, 0))


def run_worker(
    study: optuna.Study,
    objective: Objective,
    *,
    max_trials: int,
    worker_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    catch: tuple[type[Exception], ...] = (),
    poll: float = 1.0,
) -> WorkerSummary:
    """Run trials of ``study`` until it holds ``max_trials`` COMPLETE logical trials.

    Safe to run in any number of processes at once (see the module docstring for how the cap
    is kept exact). When every remaining slot is held by other workers' RUNNING trials, the
    worker keeps polling (every ``poll`` s) as long as it could detect those workers dying
    (heartbeat storage, or journal trials of this host) and then runs their retries; otherwise
    it returns and :func:`wait_for_study` does the waiting. ``worker_id`` (default: host-pid)
    and ``hostname`` are stored as trial user attrs. ``progress(done, max_trials)`` is called
    whenever the count of complete logical trials changes. An objective exception fails its trial and is re-raised
    unless listed in ``catch``.
    """
    if max_trials < 1:
        raise ValueError(f"max_trials must be >= 1, got {max_trials}")
    host = socket.gethostname()
    summary = WorkerSummary(worker_id or f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    started = time.monotonic()
    max_retry = max_retry_of(study)

    local_check = journal_path(study._storage) is not None
    current: list[int] = []  # storage id of the trial being run, for taken_over

    def guarded(trial: optuna.Trial) -> float | Sequence[float]:
        current.append(trial._trial_id)
        trial.set_user_attr("worker_id", summary.worker_id)
        trial.set_user_attr("hostname", host)
        if local_check:  # what fail_dead_trials reads; RDB storages have the heartbeat instead
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("trial", trial.number)
        trials = study.get_trials(deepcopy=False)
        key = next(logical_number(t) for t in trials if t._trial_id == trial._trial_id)
        if key == trial.number:  # a fresh trial: lower numbers win the race for the last slots
            lower = tally(trials, max_retry, before=key)
            if lower.committed >= max_trials:
                trial.set_user_attr(OVER_CAP_ATTR, True)
                raise _OverCap(f"trial {trial.number} is past the cap of {max_trials}")
        try:
            return objective(trial)
        except Exception:
            trial.set_user_attr(ERROR_ATTR, True)  # a real failure: not to be retried
            raise

    def record(study_: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(OVER_CAP_ATTR):
            summary.over_cap += 1
        elif trial.state == TrialState.COMPLETE:
            summary.completed.append(trial.number)
        elif trial.state == TrialState.FAIL:
            summary.failed.append(trial.number)

    reported = -1
    while True:
        fail_dead_trials(study)
        now = tally(study.get_trials(deepcopy=False), max_retry)
        if progress is not None and len(now.complete) != reported:
            reported = len(now.complete)
            progress(min(reported, max_trials), max_trials)
        if len(now.complete) >= max_trials:
            summary.study_complete = True
            break
        if now.waiting or now.committed < max_trials:
            if catch and len(summary.failed) >= max_trials:
                raise RuntimeError(
                    f"worker {summary.worker_id}: {len(summary.failed)} trials of study "
                    f"{study.study_name!r} failed; fix the objective before searching further"
                )
            current.clear()
            try:
                study.optimize(guarded, n_trials=1, catch=catch, callbacks=[record])
            except Exception:
                if not taken_over(study, current):
                    raise
                summary.taken_over += 1
            continue
        if not can_detect_deaths(study, host):
            break
        time.sleep(poll)
    summary.elapsed_s = time.monotonic() - started
    return summary


def wait_for_study(study: optuna.Study, max_trials: int, *, timeout: float,
                   poll: float = 1.0) -> None:
    """Block until ``study`` holds ``max_trials`` COMPLETE logical trials.

    While waiting it fails dead workers' trials (heartbeat / dead local pid) so their retries
    can be picked up by live workers; it runs no trial itself. Raises :class:`TimeoutError`
    after ``timeout`` seconds with the study's state and what to do.
    """
    deadline = time.monotonic() + timeout
    while True:
        fail_dead_trials(study)
        now = tally(study.get_trials(deepcopy=False), max_retry_of(study))
        if len(now.complete) >= max_trials:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"study {study.study_name!r}: {len(now.complete)}/{max_trials} trials complete "
                f"after {timeout:.0f} s ({now.running} running, {now.waiting} waiting for a "
                f"worker, {len(now.failed)} failed). Start more workers (`slimline search "
                "worker RECIPE --storage URL`), or, if a worker on another machine died while "
                "using a journal file (no heartbeat), use PostgreSQL storage instead"
            )
        time.sleep(poll)
