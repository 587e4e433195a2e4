"""The search on a real PostgreSQL server (tests/postgres/start_local_postgres.sh, or .ci/run's).

Each test gets a database of its own, owned by a role of its own with a random password (conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import optuna
import pytest
from conftest import REPO

from cola_hf.studies.search.storage import AdvisoryLock, lock_key, study_lock


def python_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start_holder(url: str, study_name: str, hold_limit_s: int | None = None) -> subprocess.Popen:
    """Another worker: takes the study's lock, says so, and keeps it until it is stopped or killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from cola_hf.studies.search import storage
        if {hold_limit_s!r} is not None:
            storage.LOCK_HOLD_LIMIT_S = {hold_limit_s!r}
        lock = storage.AdvisoryLock({url!r}, {study_name!r})
        lock.acquire()
        print("held", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env=python_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def waiting_advisory_locks(url: str) -> int:
    """Sessions of this database waiting for an advisory lock, as the server's lock table shows them."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(
            sqlalchemy.text(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
            )
        ).scalar_one()
    engine.dispose()
    return count


def acquire_in_thread(lock: AdvisoryLock) -> threading.Thread:
    thread = threading.Thread(target=lock.acquire, daemon=True)
    thread.start()
    return thread


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


# --- the study lock ---------------------------------------------------------------------------------------------
def test_the_study_lock_is_the_databases_and_a_killed_holder_lets_go_of_it(postgres_database):
    holder = start_holder(postgres_database, "cola-wide")
    lock = AdvisoryLock(postgres_database, "cola-wide")
    try:
        waiter = acquire_in_thread(lock)
        wait_until(lambda: waiting_advisory_locks(postgres_database) == 1, "worker waiting for the lock")
        assert waiter.is_alive() and not lock.is_locked
        # Another study's lock is another key: free while the first one is held.
        with AdvisoryLock(postgres_database, "cola-other") as other:
            assert other.is_locked and lock_key("cola-other") != lock_key("cola-wide")

        holder.send_signal(signal.SIGKILL)  # its connection drops, and the lock with it
        holder.wait(timeout=30)
        waiter.join(timeout=60)
        assert not waiter.is_alive() and lock.is_locked
        # Re-entrant, like the file locks of the journal storage; free again after the outer release.
        with lock:
            assert lock.is_locked
        lock.release()
        assert not lock.is_locked and waiting_advisory_locks(postgres_database) == 0
        with AdvisoryLock(postgres_database, "cola-wide") as again:
            assert again.is_locked
    finally:
        holder.kill()
        lock.close()


def test_a_holder_that_goes_silent_loses_the_lock_after_the_hold_limit(postgres_database):
    """SIGSTOP stands for a machine that vanished: no FIN, the connection stays open; the server ends the
    session once its transaction has been idle for the hold limit (2 s here, LOCK_HOLD_LIMIT_S in a worker)."""
    holder = start_holder(postgres_database, "cola-wide", hold_limit_s=2)
    lock = AdvisoryLock(postgres_database, "cola-wide")
    try:
        holder.send_signal(signal.SIGSTOP)
        waiter = acquire_in_thread(lock)
        waiter.join(timeout=60)
        assert not waiter.is_alive() and lock.is_locked
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        lock.close()


def test_workers_counting_slots_under_the_lock_create_exactly_n_trials(postgres_database):
    """Three processes race to count the study's trials and create one more while fewer than 5 exist."""
    storage = optuna.storages.RDBStorage(postgres_database)
    optuna.create_study(study_name="budget", storage=storage)
    code = textwrap.dedent(
        f"""
        import optuna
        from pathlib import Path
        from cola_hf.studies.search.storage import study_lock
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name="budget", storage={postgres_database!r})
        lock = study_lock({postgres_database!r}, "budget", Path("."))
        created = 0
        while True:
            with lock:
                if len(study.get_trials(deepcopy=False)) >= 5:
                    break
                trial = study.ask()
            study.tell(trial, 1.0)
            created += 1
        print(created)
        """
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", code], env=python_env(), stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    created = [int(worker.communicate(timeout=120)[0]) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0]
    study = optuna.load_study(study_name="budget", storage=storage)
    assert sum(created) == 5 and len(study.get_trials()) == 5


def test_the_lock_lives_where_the_study_lives(tmp_path, postgres_database):
    assert isinstance(study_lock(postgres_database, "s", tmp_path), AdvisoryLock)
    journal_lock = study_lock(None, "s", tmp_path)
    assert journal_lock.lock_file == str(tmp_path / "study.journal.lock")
    assert study_lock(f"sqlite:///{tmp_path}/shared.db", "s", tmp_path / "elsewhere").lock_file == str(
        tmp_path / "shared.db.lock"
    )
    with pytest.raises(ValueError, match="advisory locks"):
        study_lock("mysql://u@host/db", "s", tmp_path)
