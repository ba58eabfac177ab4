"""Study storage from a URL: a journal file (the one-machine default) or an RDB with heartbeat.

See :mod:`slimline.search.study` for how workers use it. Forms of ``storage``:

* ``None``: ``JournalStorage(JournalFileBackend(default_journal))``, no server needed, safe for
  several processes on one machine (Optuna 5.0's journal has no heartbeat).
* ``journal:///abs/path.log`` or a path ending in ``.log``: that journal file.
* ``postgresql://``, ``mysql://``, ``sqlite:///`` (``+driver`` allowed): ``RDBStorage`` with
  ``heartbeat_interval``/``grace_period`` and ``RetryHeartbeatStaleTrialCallback(max_retry)``,
  so a trial whose worker stopped beating is failed and re-queued with the same params.
"""

from __future__ import annotations

import importlib.util
import warnings
import weakref
from pathlib import Path

from optuna.exceptions import ExperimentalWarning
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend

__all__ = ["StudyStorageError", "journal_path", "open_storage", "redact"]

RDB_SCHEMES = ("postgresql", "mysql", "sqlite")
# Python module of a database driver -> the pip package that provides it.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary",
                   "pg8000": "pg8000", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL"}
# Journal storages opened here -> their file (the dead-process check locks a file beside it).
_JOURNAL_PATHS: weakref.WeakKeyDictionary[BaseStorage, Path] = weakref.WeakKeyDictionary()


class StudyStorageError(RuntimeError):
    """The storage URL is malformed, its driver is missing, or the server cannot be reached."""


def redact(url: str) -> str:
    """The URL without its password (errors must not print credentials)."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail:
        creds, _, host = tail.rpartition("@")
        return f"{head}://{creds.split(':')[0]}:***@{host}"
    return url


def _journal(path: Path) -> JournalStorage:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    _JOURNAL_PATHS[storage] = path
    return storage


def _with_installed_postgres_driver(url: str) -> str:
    """``postgresql://`` -> the installed driver's dialect (psycopg 3, else psycopg2).

    SQLAlchemy 2.0 maps a bare ``postgresql://`` to psycopg2 and 2.1 to psycopg 3; naming the
    installed one makes either work.
    """
    if not url.startswith("postgresql://"):
        return url
    for module in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{module}://" + url[len("postgresql://"):]
    return url


def _rdb(url: str, heartbeat_interval: int, grace_period: int, max_retry: int) -> RDBStorage:
    url = _with_installed_postgres_driver(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat args are "experimental"
        try:
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry),
            )
        except ImportError as exc:
            missing = getattr(exc.__cause__, "name", None) or ""
            package = DRIVER_PACKAGES.get(missing.split(".")[0], "the driver of this database")
            raise StudyStorageError(
                f"storage {redact(url)!r} needs a database driver that is not installed "
                f"({exc}); install it with `pip install {package}`"
            ) from exc
        except Exception as exc:  # sqlalchemy.exc.OperationalError and friends
            raise StudyStorageError(
                f"cannot open study storage {redact(url)!r}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''} (is the server running and "
                "the database created?)"
            ) from exc


def journal_path(storage: BaseStorage) -> Path | None:
    """The file of a journal storage opened by :func:`open_storage`, else None."""
    return _JOURNAL_PATHS.get(storage)


def open_storage(storage: str | None, *, default_journal: Path, heartbeat_interval: int,
                 grace_period: int, max_retry: int) -> BaseStorage:
    """The storage for ``storage`` (forms in the module docstring).

    Raises :class:`StudyStorageError` for an unknown scheme, a relative journal URL, a missing
    driver (naming the pip package) or an unreachable server.
    """
    if storage is None:
        return _journal(Path(default_journal))
    if storage.startswith("journal://"):
        path = Path(storage[len("journal://"):])
        if not path.is_absolute():
            raise StudyStorageError(
                f"journal URL {storage!r} needs an absolute path: journal:///abs/path/study.log"
            )
        return _journal(path)
    if "://" not in storage and storage.endswith(".log"):
        return _journal(Path(storage).resolve())
    if storage.split("://", 1)[0].split("+", 1)[0] in RDB_SCHEMES:
        return _rdb(storage, heartbeat_interval, grace_period, max_retry)
    raise StudyStorageError(
        f"unknown study storage {redact(storage)!r}; use a journal file "
        "(journal:///abs/path/study.log or path/study.log), postgresql://user@host:port/db, "
        "mysql://user@host/db or sqlite:///path/study.db"
    )
