"""Where a search's study lives, and the lock its workers take trials by.

The storage: a journal file in OUTPUT_DIR/search by default, or an Optuna RDB storage URL. Why a journal file,
not SQLite, by default: Optuna recommends its JournalStorage for several processes on one machine without a
database server (SQLite serialises writers with file locks and answers a busy database with "database is
locked" errors); it is an append-only log, so a worker killed mid-write costs at most its own last line; and it
works on NFS, where SQLite's locking does not, so workers on several machines can share an OUTPUT_DIR on a shared
file system too. A URL (postgresql://, sqlite:///) gets Optuna's RDBStorage with heartbeats, so a machine that
dies is noticed by the others (docs/cluster.md, "A search on a cluster").

The study lock serialises what must not interleave between workers: creating the study and recording its space,
counting the trial slots and creating the next trial, failing a trial whose worker is gone, and claiming the
building of best/. It lives where the study lives, so that every worker that shares the study shares the lock,
whatever else it shares:

    journal file (default)     a file lock beside the journal, OUTPUT_DIR/search/study.lock
    sqlite:///PATH             a file lock beside the database file, PATH.cola.lock
    postgresql://...           an advisory lock of the database, held for one transaction on a connection of
                               its own (pg_advisory_xact_lock)

It is held for milliseconds at a time: nothing slow (a trial, the reports, best/) runs under it.
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import optuna
from filelock import FileLock
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from cola_hf.errors import UsageError, one_line
from cola_hf.redaction import redact_text

JOURNAL_FILE = "study.journal"
STUDY_LOCK_FILE = "study.lock"  # beside the journal, in OUTPUT_DIR/search
# An interrupted trial is run again with the same parameters at most this often (then it counts as failed).
MAX_RETRIES = 2
# How long a worker waits for the database server to answer a new connection before giving up in one line:
# libpq's default is to wait for the operating system, minutes for a host that drops packets. A URL's own
# ?connect_timeout= wins.
CONNECT_TIMEOUT_S = 10
# The database ends a lock holder's session that stays idle inside its transaction this long: a worker killed in
# any way drops its connection (and the lock) at once, but one whose machine vanished sends nothing, and would
# otherwise hold the lock until TCP gives up on it (hours).
LOCK_HOLD_LIMIT_S = 300
# The backends whose study lock is known (see the module's docstring).
LOCKING_BACKENDS = ("postgresql", "sqlite")


# --- the storage ---------------------------------------------------------------------------------------------------
def open_storage(url: str | None, search_dir: Path, heartbeat_interval: int, grace_period: int) -> BaseStorage:
    """The study's storage: the journal file in `search_dir`, or the RDB storage at `url`.

    An RDB storage gets Optuna's heartbeat: every `heartbeat_interval` seconds the worker running a trial says it
    is alive; a trial silent for `grace_period` seconds is failed and queued again by the next worker that looks.
    Bad URLs, servers that cannot be reached and databases that refuse Optuna's tables are one line each.
    """
    if url is None:
        return JournalStorage(JournalFileBackend(str(search_dir / JOURNAL_FILE)))
    import sqlalchemy

    shown = describe_storage(url, search_dir)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(f"--search_storage {shown}: not a storage URL (e.g. postgresql://user@host/db)") from None
    if parsed.get_backend_name() not in LOCKING_BACKENDS:
        raise UsageError(
            f"--search_storage {shown}: {parsed.get_backend_name()} is not supported; the search keeps its trial "
            "budget with PostgreSQL's advisory locks (postgresql://...) or a file lock (sqlite:///PATH, or the "
            "default journal file)"
        )
    database = Path(parsed.database or "").expanduser()
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not database.parent.is_dir():  # checked first: a file lock beside it would create the directory
            raise UsageError(f"--search_storage {shown}: cannot open the database: no directory {database.parent}")
    tables_lock = database_lock(url, TABLES_LOCK, search_dir)
    try:
        # Optuna creates its tables the first time (CREATE TABLE, CREATE TYPE), which PostgreSQL cannot do twice
        # at once: workers started together on an empty database would fail (optuna/optuna#1092). One at a time.
        with tables_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
                engine_kwargs=engine_kwargs(url),
            )
    except Exception as err:  # sqlalchemy's OperationalError, ProgrammingError, a missing driver (ImportError)...
        raise UsageError(f"--search_storage {shown}: {why_not_opened(err, parsed)}") from None
    finally:
        if isinstance(tables_lock, AdvisoryLock):
            tables_lock.close()


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine arguments for the study's database: a bounded connect, connections checked before use."""
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def why_not_opened(err: BaseException, parsed: Any) -> str:
    """What went wrong opening the database, in words that name the server but never a password."""
    cause = getattr(err, "orig", None) or err
    message = re.sub(r"\s*\(Background on this error at: \S+\)", "", " ".join(str(cause).split()))
    message = redact_text(message)
    if parsed.get_backend_name() == "sqlite":
        where = parsed.database
    else:
        where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    name = type(cause).__name__
    if isinstance(err, ImportError):
        driver = one_line(err)
        return f"no driver for {parsed.drivername} here ({driver}); for PostgreSQL: pip install 'cola-hf[postgres]'"
    if name == "ConnectionTimeout" or "timeout expired" in message:
        timeout = parsed.query.get("connect_timeout", CONNECT_TIMEOUT_S)
        return f"no answer from the database server at {where} within {timeout} s"
    if name == "InsufficientPrivilege":
        user, database = parsed.username or "(default user)", parsed.database
        if "schema" in message:
            return (
                f"user {user} may not create Optuna's tables in database {database} ({message}); ask its owner "
                f"to GRANT CREATE ON SCHEMA public TO {user}, or to start the search once as a user who may"
            )
        return f"user {user} may not use Optuna's tables in database {database} ({message}); ask its owner for access"
    if isinstance(cause, Exception) and type(cause).__module__.startswith(("psycopg", "sqlite3", "sqlalchemy")):
        return f"cannot open the database at {where} ({message})"  # refused, unknown host, bad password...
    return f"cannot open ({redact_text(one_line(err))})"


def trials_never_beating(url: str, study_name: str, numbers: list[int]) -> list[int]:
    """Of the trials `numbers` of the study, those with no heartbeat at all in the database.

    Optuna's own check (fail_stale_trials) looks only at trials that have a heartbeat, so a worker that died
    between creating its trial and the first heartbeat (milliseconds apart) would leave it RUNNING forever, and
    the study would never end. Read from Optuna's tables directly: its API says nothing about missing heartbeats.
    """
    import sqlalchemy

    if not numbers:
        return []
    query = sqlalchemy.text(
        "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
        "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE s.study_name = :study AND h.trial_id IS NULL AND t.number IN :numbers"
    ).bindparams(sqlalchemy.bindparam("numbers", expanding=True))
    with _engine(url).connect() as connection:
        rows = connection.execute(query, {"study": study_name, "numbers": list(numbers)})
        return sorted(row[0] for row in rows)


@functools.cache
def _engine(url: str) -> Any:
    import sqlalchemy

    return sqlalchemy.create_engine(url, pool_size=1, max_overflow=0, **engine_kwargs(url))


def describe_storage(url: str | None, search_dir: Path) -> str:
    """The storage as it may be printed: never with a password."""
    if url is None:
        return str(search_dir / JOURNAL_FILE)
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return redact_text(url)


# --- the study lock ------------------------------------------------------------------------------------------------
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
        # Not study.journal.lock: that is the journal's own lock (Optuna's JournalFileSymlinkLock), which takes
        # an existing file of that name for a held lock, and removes it after 30 s.
        return FileLock(str(search_dir / STUDY_LOCK_FILE))
    return database_lock(url, f"search: {study_name}", search_dir)


# The lock for creating Optuna's tables in a database, before any study exists.
TABLES_LOCK = "optuna tables"


def database_lock(url: str, name: str, search_dir: Path) -> StudyLock:
    """A lock named `name` that every worker using the database at `url` shares."""
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return AdvisoryLock(url, name)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":  # one process's own database: its own lock will do
            return FileLock(str(search_dir / "sqlite-memory.lock"))
        # One file lock per database: the locks' names only matter where they are advisory locks of a server.
        return FileLock(f"{Path(database).expanduser()}.cola.lock")
    raise ValueError(f"no lock for {parsed.get_backend_name()} (open_storage refuses it)")


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for `name`: the same in every worker, unlike Python's hash()."""
    digest = hashlib.sha256(f"cola-hf {name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AdvisoryLock:
    """PostgreSQL's advisory lock on `name`'s key, for one transaction on a connection of its own.

    Transaction-scoped (pg_advisory_xact_lock): the lock goes with the transaction's end, the connection's loss
    (the worker was killed), or the server ending a session idle in its transaction for longer than
    LOCK_HOLD_LIMIT_S (the worker's machine vanished). Re-entrant within a worker, like filelock's locks.
    """

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        # One connection, kept between acquisitions and checked before each (a server restart drops it).
        self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0, **engine_kwargs(url))
        self.key = lock_key(name)
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
                connection.execute(
                    sqlalchemy.text("SELECT set_config('idle_in_transaction_session_timeout', :limit, true)"),
                    {"limit": str(LOCK_HOLD_LIMIT_S * 1000)},
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
