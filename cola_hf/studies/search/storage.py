"""Where a search's study lives, and the lock its workers take trials by.

The study lock serialises what must not interleave between workers: creating the study and recording its
space, counting the trial slots and creating the next trial, failing a trial whose worker is gone, and
claiming the study's end (best/). It lives where the study lives, so that every worker that shares the
study shares the lock, whatever else it shares:

    journal file (default)     a file lock beside the journal, in OUTPUT_DIR/search
    sqlite:///PATH             a file lock beside the database file
    postgresql://...           an advisory lock of the database, held for one transaction on a connection of
                               its own (pg_advisory_xact_lock)

It is held for milliseconds at a time: nothing slow (a trial, the reports, best/) runs under it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from filelock import FileLock

logger = logging.getLogger(__name__)

JOURNAL_FILE = "study.journal"
# How long a worker waits for the database server to answer a new connection before giving up in one line:
# libpq's default is to wait for the operating system, minutes for a host that drops packets.
CONNECT_TIMEOUT_S = 10
# The database ends a lock holder's session that stays idle inside its transaction this long: a worker
# killed in any way drops its connection (and the lock) at once, but one whose machine vanished sends
# nothing, and would otherwise hold the lock until TCP gives up on it (hours).
LOCK_HOLD_LIMIT_S = 300


class StudyLock(Protocol):
    """What the search needs of a lock: re-entrant, released by whoever holds it (filelock.FileLock's API)."""

    @property
    def is_locked(self) -> bool: ...

    def acquire(self) -> Any: ...

    def release(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def study_lock(url: str | None, study_name: str, search_dir: Path) -> StudyLock:
    """The lock of the study `study_name` in the storage `url` (None: the journal file in `search_dir`)."""
    if url is None:
        return FileLock(str(search_dir / f"{JOURNAL_FILE}.lock"))
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":  # one process's own database: its own lock will do
            return FileLock(str(search_dir / "sqlite-memory.lock"))
        return FileLock(f"{Path(database).expanduser()}.lock")
    if parsed.get_backend_name() == "postgresql":
        return AdvisoryLock(url, study_name)
    raise ValueError(
        f"{parsed.get_backend_name()}: the search keeps its trial budget with PostgreSQL's advisory locks or "
        "a file lock beside a journal or SQLite file; use postgresql://, sqlite:/// or the default journal"
    )


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine arguments for the study's storage: a bounded connect, connections checked before use."""
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    # The URL's own ?connect_timeout= wins (libpq reads it there too).
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def lock_key(study_name: str) -> int:
    """A signed 64-bit advisory-lock key for the study: the same in every worker, unlike Python's hash()."""
    digest = hashlib.sha256(f"cola-hf search: {study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AdvisoryLock:
    """PostgreSQL's advisory lock on the study's key, for one transaction on a connection of its own.

    Transaction-scoped (pg_advisory_xact_lock): the lock goes with the transaction's end, the connection's
    loss (the worker was killed), or the server ending a session idle in its transaction for longer than
    LOCK_HOLD_LIMIT_S (the worker's machine vanished). Re-entrant within a worker, like filelock's locks.
    """

    def __init__(self, url: str, study_name: str) -> None:
        import sqlalchemy

        # One connection, kept between acquisitions and checked before each (a server restart drops it).
        self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0, **engine_kwargs(url))
        self.key = lock_key(study_name)
        self._connection: Any = None
        self._depth = 0

    @property
    def is_locked(self) -> bool:
        return self._depth > 0

    def acquire(self) -> AdvisoryLock:
        if self._depth == 0:
            import sqlalchemy

            connection = self._engine.connect()
            try:
                limit_ms = str(LOCK_HOLD_LIMIT_S * 1000)
                connection.execute(
                    sqlalchemy.text("SELECT set_config('idle_in_transaction_session_timeout', :limit, true)"),
                    {"limit": limit_ms},
                )
                connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": self.key})
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        self._depth += 1
        return self

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            connection, self._connection = self._connection, None
            try:
                connection.commit()  # the transaction ends, and its advisory lock with it
            finally:
                connection.close()

    def __enter__(self) -> AdvisoryLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def close(self) -> None:
        """Let go of the lock if held, and of the connection."""
        while self._depth:
            self.release()
        self._engine.dispose()
