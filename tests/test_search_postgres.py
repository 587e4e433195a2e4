"""The search on a real PostgreSQL server (tests/postgres/start_local_postgres.sh, or .ci/run's).

Each test gets a database of its own, owned by a role of its own with a random password (conftest.py). The
searches are the real command line in subprocesses, one per worker, on the tiny BERT and the verb-rule CoLA
files of tests/test_search.py; heartbeats are set short where a test waits for one.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import psycopg
import pytest
import sqlalchemy
from conftest import error_line, postgres_admin
from launching import REPO, cola_command, offline_env, run_here, start_process, wait_for_file
from optuna.trial import TrialState
from test_search import write_sweep

from cola_hf.errors import UsageError
from cola_hf.studies.search.storage import (
    CONNECT_TIMEOUT_S,
    AdvisoryLock,
    engine_kwargs,
    lock_key,
    open_storage,
    study_lock,
    why_not_opened,
)


@pytest.fixture(scope="module")
def search_args(verb_cola_dir, encoder_dir) -> list[str]:
    """The options every worker of these searches shares: tiny encoder, verb-rule files, one epoch, no W&B."""
    return [
        "--cola_source", str(verb_cola_dir), "--model_name_or_path", str(encoder_dir), "--annotations_source", "none",
        "--max_seq_length", "16", "--global_train_batch_size", "8", "--num_train_epochs", "1",
        "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip


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
    holder = subprocess.Popen([sys.executable, "-c", code], env=offline_env(), stdout=subprocess.PIPE, text=True)
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
    holder = start_holder(postgres_database, "search: cola-wide")
    lock = AdvisoryLock(postgres_database, "search: cola-wide")
    try:
        waiter = acquire_in_thread(lock)
        wait_until(lambda: waiting_advisory_locks(postgres_database) == 1, "worker waiting for the lock")
        assert waiter.is_alive() and not lock.is_locked
        # Another study's lock is another key: free while the first one is held.
        with AdvisoryLock(postgres_database, "search: cola-other") as other:
            assert other.is_locked and lock_key("search: cola-other") != lock_key("search: cola-wide")

        holder.send_signal(signal.SIGKILL)  # its connection drops, and the lock with it
        holder.wait(timeout=30)
        waiter.join(timeout=60)
        assert not waiter.is_alive() and lock.is_locked
        # Re-entrant, like the file locks of the journal storage; free again after the outer release.
        with lock:
            assert lock.is_locked
        lock.release()
        assert not lock.is_locked and waiting_advisory_locks(postgres_database) == 0
        with AdvisoryLock(postgres_database, "search: cola-wide") as again:
            assert again.is_locked
    finally:
        holder.kill()
        lock.close()


def test_a_holder_that_goes_silent_loses_the_lock_after_the_hold_limit(postgres_database):
    """SIGSTOP stands for a machine that vanished: no FIN, the connection stays open; the server ends the
    session once its transaction has been idle for the hold limit (2 s here, LOCK_HOLD_LIMIT_S in a worker)."""
    holder = start_holder(postgres_database, "search: cola-wide", hold_limit_s=2)
    lock = AdvisoryLock(postgres_database, "search: cola-wide")
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
        subprocess.Popen([sys.executable, "-c", code], env=offline_env(), stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    created = [int(worker.communicate(timeout=120)[0]) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0]
    study = optuna.load_study(study_name="budget", storage=storage)
    assert sum(created) == 5 and len(study.get_trials()) == 5


def test_the_lock_lives_where_the_study_lives(tmp_path, postgres_database):
    assert isinstance(study_lock(postgres_database, "s", tmp_path), AdvisoryLock)
    journal_lock = study_lock(None, "s", tmp_path)
    assert journal_lock.lock_file == str(tmp_path / "study.lock")
    assert study_lock(f"sqlite:///{tmp_path}/shared.db", "s", tmp_path / "elsewhere").lock_file == str(
        tmp_path / "shared.db.cola.lock"
    )
    with pytest.raises(UsageError, match="mysql is not supported; the search keeps its trial budget with"):
        open_storage("mysql://u:pw@host/db", tmp_path, heartbeat_interval=60, grace_period=300)


# --- whole searches on one PostgreSQL study -----------------------------------------------------------------------
SHARED_STUDY = "shared"


def search_command(base_args: list, out, space, n_trials: int, storage: str, *extra) -> list[str]:
    """One worker's command: the same for every worker of the study, but for its own --output_dir."""
    return cola_command(
        *base_args, "--output_dir", out, "--search", space, "--n_trials", n_trials,
        "--search_storage", storage, "--experiment_name", SHARED_STUDY, *extra,
    )  # fmt: skip


def start_worker(command: list[str], env: dict | None = None, hooks: Path | None = None) -> subprocess.Popen:
    return start_process(command, env, hooks)


def finish_workers(workers: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    try:
        logs = [worker.communicate(timeout=timeout)[0] for worker in workers]
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        raise AssertionError(f"a worker still runs after {timeout:.0f} s") from None
    failed = [f"exit {worker.returncode}:\n{log[-3000:]}" for worker, log in zip(workers, logs, strict=True)]
    assert all(worker.returncode == 0 for worker in workers), "\n\n".join(failed)
    return logs


def shared_study(url: str) -> optuna.Study:
    return optuna.load_study(study_name=SHARED_STUDY, storage=url)


def trial_states(url: str) -> list[str]:
    return [trial.state.name for trial in shared_study(url).get_trials(deepcopy=False)]


@pytest.mark.xdist_group("postgres-three-workers")  # searches in subprocesses: a group of its own
def test_three_workers_with_their_own_output_dirs_run_exactly_n_trials_and_build_one_best(
    tmp_path, search_args, postgres_database
):
    space = write_sweep(
        tmp_path / "space.yaml",
        "random",
        {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}},
    )
    outs = [tmp_path / f"machine-{index}" for index in range(3)]  # as on machines that share no file system
    commands = [search_command(search_args, out, space, 4, postgres_database) for out in outs]
    logs = finish_workers([start_worker(command) for command in commands])

    study = shared_study(postgres_database)
    assert trial_states(postgres_database) == ["COMPLETE"] * 4
    # Each trial ran once, in one worker's directory.
    ran_in = {
        trial.number: [out for out in outs if (out / "trials" / f"trial-{trial.number:03d}" / "results.json").is_file()]
        for trial in study.trials
    }
    assert all(len(where) == 1 for where in ran_in.values()), ran_in
    # best/: one, built once, for the study's best trial; no other worker built one.
    best_dirs = [out / "best" for out in outs if (out / "best").exists()]
    assert len(best_dirs) == 1, best_dirs
    results = json.loads((best_dirs[0] / "results.json").read_text())
    assert results["config"]["search"]["trial"] == study.best_trial.number
    assert sum(log.count("its model and test results are in") for log in logs) == 1
    # Only the best trial's model is kept, in whichever directory its worker had.
    kept = [path for out in outs for path in (out / "trials").glob("trial-*/model")]
    assert kept == [ran_in[study.best_trial.number][0] / "trials" / f"trial-{study.best_trial.number:03d}" / "model"]

    # The same command after the end: no trial added, best/ left alone.
    built = (best_dirs[0] / "results.json").stat().st_mtime_ns
    again = run_here(*commands[1][2:])  # less python and the script
    assert again.returncode == 0, again.stderr[-3000:]
    assert trial_states(postgres_database) == ["COMPLETE"] * 4
    assert (best_dirs[0] / "results.json").stat().st_mtime_ns == built


@pytest.mark.xdist_group("postgres-killed-worker")  # searches in subprocesses: a group of its own
def test_a_worker_killed_mid_trial_is_noticed_by_its_heartbeat_and_its_trial_run_again(
    tmp_path, search_args, postgres_database, signal_hooks
):
    """Separate output directories: only the heartbeat in the database can tell the others that a worker died."""
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3, 2e-3, 1e-3]}})
    heartbeat = ["--search_heartbeat_interval", "1", "--search_grace_period", "3", "--num_train_epochs", "2"]
    victim_out, survivor_out, hold = tmp_path / "victim", tmp_path / "survivor", tmp_path / "hold"
    hold.touch()
    # Held in its first trial's second epoch (23 steps of 8 sentences each), past that trial's first checkpoint.
    victim = start_worker(
        search_command(search_args, victim_out, space, 2, postgres_database, *heartbeat),
        {"COLA_TEST_HOLD": f"step:30:{hold}"},
        signal_hooks,
    )
    survivor = start_worker(search_command(search_args, survivor_out, space, 2, postgres_database, *heartbeat))

    def victim_mid_trial():
        try:
            running = shared_study(postgres_database).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # no study yet
            return None
        for trial in running:
            if trial.user_attrs.get("pid") == victim.pid and list(
                (victim_out / "trials" / f"trial-{trial.number:03d}").glob("checkpoint-*")
            ):
                return trial
        return None

    wait_for_file(Path(f"{hold}.reached"), victim, timeout=240)
    killed = victim_mid_trial()
    assert killed is not None
    victim.send_signal(signal.SIGKILL)
    killed_at = datetime.now()
    victim.wait(timeout=30)
    (log,) = finish_workers([survivor])

    trials = shared_study(postgres_database).get_trials()
    states = {trial.number: trial.state.name for trial in trials}
    (rerun,) = [trial for trial in trials if trial.system_attrs.get("retry_history") == [killed.number]]
    assert states[killed.number] == "FAIL" and rerun.state.name == "COMPLETE"
    assert rerun.params == killed.params and rerun.user_attrs["pid"] == survivor.pid
    assert sorted(states.values()) == ["COMPLETE"] * 2 + ["FAIL"]
    assert f"Trial {killed.number}: no heartbeat from its worker" in log
    failed = next(trial for trial in trials if trial.number == killed.number)
    failed_s = (failed.datetime_complete - killed_at).total_seconds()
    rerun_s = (rerun.datetime_start - killed_at).total_seconds()
    print(
        f"\nstates {states}; trial {killed.number} killed; failed {failed_s:.1f} s later, rerun as trial "
        f"{rerun.number} {rerun_s:.1f} s later (heartbeat 1 s, grace 3 s)"
    )


@pytest.mark.xdist_group("postgres-paused-worker")  # searches in subprocesses: a group of its own
def test_a_worker_paused_past_the_grace_period_loses_its_trial_to_another_and_goes_on(
    tmp_path, search_args, postgres_database, signal_hooks
):
    """SIGSTOP, as Slurm's PreemptMode=SUSPEND does: the paused worker's heartbeat stops, another worker fails its
    trial and runs it again; resumed, the first one's trial ends, is not recorded (it was failed), and the worker
    carries on without a traceback."""
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3, 2e-3, 1e-3]}})
    heartbeat = ["--search_heartbeat_interval", "1", "--search_grace_period", "3"]
    hold = tmp_path / "hold"
    hold.touch()
    paused = start_worker(  # held at its first trial's second step until paused: caught mid-trial
        search_command(search_args, tmp_path / "paused", space, 2, postgres_database, *heartbeat),
        {"COLA_TEST_HOLD": f"step:2:{hold}"},
        signal_hooks,
    )
    other = start_worker(search_command(search_args, tmp_path / "other", space, 2, postgres_database, *heartbeat))

    def paused_trial():
        try:
            running = shared_study(postgres_database).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # no study yet
            return None
        return next((trial for trial in running if trial.user_attrs.get("pid") == paused.pid), None)

    wait_for_file(Path(f"{hold}.reached"), paused, timeout=240)
    taken = paused_trial()
    assert taken is not None
    paused.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: trial_states(postgres_database)[taken.number] == "FAIL", "its trial failed", 120)
    finally:
        hold.unlink()  # resumed, it trains on
        paused.send_signal(signal.SIGCONT)
    logs = finish_workers([paused, other])

    trials = shared_study(postgres_database).get_trials()
    (rerun,) = [trial for trial in trials if trial.system_attrs.get("retry_history") == [taken.number]]
    assert trials[taken.number].state.name == "FAIL" and rerun.state.name == "COMPLETE"
    assert sorted(trial.state.name for trial in trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert f"Trial {taken.number} was failed by another worker while this one ran it" in logs[0]
    assert "Traceback" not in logs[0] and "Should not reach" not in logs[0]


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_run_again(tmp_path, search_args, postgres_database):
    """A worker killed between creating its trial and its first heartbeat (milliseconds apart) leaves a RUNNING
    trial that Optuna's heartbeat check never looks at: without another check the study would wait for it forever."""
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3]}})
    storage = optuna.storages.RDBStorage(postgres_database)
    optuna.create_study(study_name=SHARED_STUDY, storage=storage, direction="maximize").ask()  # then it died
    heartbeat = ["--search_heartbeat_interval", "1", "--search_grace_period", "3"]
    command = search_command(search_args, tmp_path / "out", space, 1, postgres_database, *heartbeat)
    (log,) = finish_workers([start_worker(command)], timeout=120)  # a subprocess: waiting forever fails the test
    assert "Trial 0 started over 3 s ago and never recorded a heartbeat" in log
    trials = shared_study(postgres_database).get_trials()
    assert [trial.state.name for trial in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].system_attrs["retry_history"] == [0]


@pytest.mark.xdist_group("postgres-password")  # searches in subprocesses: a group of its own
def test_the_storage_password_is_recorded_nowhere(tmp_path, search_args, postgres_database):
    """W&B offline writes its runs under each trial's directory and best/: they are searched too."""
    from test_tracking import no_credentials_env

    password = urlsplit(postgres_database).password
    space = write_sweep(tmp_path / "space.yaml", "grid", {"learning_rate": {"values": [5e-3, 1e-7]}})
    out = tmp_path / "search"
    args = [*search_args, "--report_to", "wandb"]
    env = {**no_credentials_env(tmp_path), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = search_command(args, out, space, 2, postgres_database)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trial_states(postgres_database) == ["COMPLETE", "COMPLETE"]
    assert list(out.glob("trials/*/wandb/offline-run-*")) and list(out.glob("best/wandb/offline-run-*"))

    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) > 50
    assert [path for path in files if password.encode() in path.read_bytes()] == []
    assert password not in result.stdout + result.stderr
    # What is recorded instead names the server and the database, masked.
    masked = postgres_database.replace(password, "***")
    assert masked in (out / "best" / "README.md").read_text()


# --- bad input -------------------------------------------------------------------------------------------------
def test_a_server_that_never_answers_is_one_line_naming_it_within_the_connect_timeout(tmp_path, search_args):
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [1e-3]}})
    with socket.socket() as silent:  # accepts connections (the kernel does), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        # The URL's own timeout, 2 s (libpq's least), bounds the wait rather than the operating system's minutes;
        # the default one (10 s) takes the same way, checked below without waiting for it.
        url = f"postgresql+psycopg://cola:planted-secret@127.0.0.1:{port}/cola?connect_timeout=2"
        result = run_here(*search_command(search_args, tmp_path / "out", space, 2, url)[2:])  # less python, script
    code, err = result.returncode, result.stderr
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"--search_storage postgresql+psycopg://cola:***@127.0.0.1:{port}/cola?connect_timeout=2: ")
    assert f"no answer from the database server at 127.0.0.1:{port} within 2 s" in line
    assert "planted-secret" not in err

    # Without ?connect_timeout= the driver is given CONNECT_TIMEOUT_S, and the line names it.
    default_url = url.split("?")[0]
    assert CONNECT_TIMEOUT_S == 10
    assert engine_kwargs(default_url)["connect_args"] == {"connect_timeout": CONNECT_TIMEOUT_S}
    timed_out = psycopg.errors.ConnectionTimeout("connection timeout expired")
    assert why_not_opened(timed_out, sqlalchemy.engine.make_url(default_url)) == (
        f"no answer from the database server at 127.0.0.1:{port} within 10 s"
    )


def test_a_database_that_refuses_to_create_tables_is_one_line_saying_what_to_ask_for(
    tmp_path, search_args, postgres_server, postgres_database
):
    """A role that may log in and use the database, but not create tables in its schema (PostgreSQL 15's default
    for anyone but the owner)."""
    owner = urlsplit(postgres_database)
    guest = f"{owner.username}_guest"
    with postgres_admin(postgres_server) as admin:
        admin.execute(f"CREATE ROLE {guest} LOGIN PASSWORD 'guest-secret'")
    try:
        url = f"postgresql+psycopg://{guest}:guest-secret@{owner.hostname}:{owner.port}{owner.path}"
        space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [1e-3]}})
        result = run_here(*search_command(search_args, tmp_path / "out", space, 2, url)[2:])
        code, err = result.returncode, result.stderr
    finally:
        with postgres_admin(postgres_server) as admin:
            admin.execute(f"DROP OWNED BY {guest}")
            admin.execute(f"DROP ROLE {guest}")
    assert code == 2
    line = error_line(err)
    assert f"user {guest} may not create Optuna's tables in database {owner.path[1:]}" in line
    assert "guest-secret" not in err


@pytest.mark.xdist_group("postgres-two-sweeps")  # searches in subprocesses: a group of its own
def test_two_sweep_files_under_one_study_name_the_second_is_refused(tmp_path, search_args, postgres_database):
    """Started together: the study lock lets one create the study and record its space; the other is refused."""
    first = write_sweep(tmp_path / "first.yaml", "random", {"learning_rate": {"values": [5e-3]}})
    second = write_sweep(tmp_path / "second.yaml", "random", {"learning_rate": {"values": [1e-3, 2e-3]}})
    workers = [
        start_worker(search_command(search_args, tmp_path / f"out-{space.stem}", space, 1, postgres_database))
        for space in (first, second)
    ]
    logs = [worker.communicate(timeout=300)[0] for worker in workers]
    codes = sorted(worker.returncode for worker in workers)
    assert codes == [0, 2], logs
    refused = logs[[worker.returncode for worker in workers].index(2)]
    assert f"study '{SHARED_STUDY}' in this storage searched another space than" in refused
    assert trial_states(postgres_database) == ["COMPLETE"]
