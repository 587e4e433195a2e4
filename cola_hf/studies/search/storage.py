"""Where a search's study lives: a journal file in OUTPUT_DIR/search by default, or an Optuna RDB storage URL.

Why a journal file, not SQLite, by default: Optuna recommends its JournalStorage for several processes on one
machine without a database server (SQLite serialises writers with file locks and answers a busy database with
"database is locked" errors); it is an append-only log, so a worker killed mid-write costs at most its own last
line; and it works on NFS, where SQLite's locking does not, so workers on several machines can share an
OUTPUT_DIR on a shared file system too. A URL (postgresql://, mysql://, sqlite://) gets Optuna's RDBStorage with
heartbeats, so a machine that dies is noticed by the others.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from cola_hf.errors import UsageError, one_line

JOURNAL_FILE = "study.journal"
# An interrupted trial is run again with the same parameters at most this often (then it counts as failed).
MAX_RETRIES = 2
# Only for storages given by URL (several machines): a worker that stops beating for GRACE_S is failed.
HEARTBEAT_S, GRACE_S = 60, 300


def open_storage(url: str | None, search_dir: Path) -> BaseStorage:
    """The study's storage: the journal file in `search_dir`, or the RDB storage at `url`."""
    if url is None:
        return JournalStorage(JournalFileBackend(str(search_dir / JOURNAL_FILE)))
    import sqlalchemy

    shown = describe_storage(url, search_dir)
    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(f"--search_storage {shown}: not a storage URL (e.g. postgresql://user@host/db)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
                engine_kwargs={"pool_pre_ping": True},
            )
    except Exception as err:  # sqlalchemy's OperationalError, a missing driver (ImportError), a bad dialect...
        raise UsageError(f"--search_storage {shown}: cannot open ({one_line(err)})") from None


def describe_storage(url: str | None, search_dir: Path) -> str:
    """The storage as it may be printed: never with a password."""
    if url is None:
        return str(search_dir / JOURNAL_FILE)
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1] if "@" in url else url
