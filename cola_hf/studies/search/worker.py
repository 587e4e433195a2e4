"""`--search SWEEP.yaml --n_trials N`: an Optuna study over a W&B sweep file's space, and the best model back.

    OUTPUT_DIR/search/     study.journal (the study), trials.csv/.md, best_params.yaml, plots, overhead.md
    OUTPUT_DIR/trials/     trial-000, trial-001, ...: each trial's epochs, results.json (no test sets), W&B run
    OUTPUT_DIR/best/       a normal run's complete outputs for the best trial's best epoch, model included

This module is a worker: it takes free slots of the study and runs trials in them (trial.py) until the study
holds --n_trials, waits for the trials other workers still run (taking over any whose worker dies), then writes
the reports (report.py) and, if it is the worker to, best/ (best.py). What it optimises: objective.py. Why not
`Trainer.hyperparameter_search`: docs/architecture.md ("Why this way, and not the library's own").
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import datasets
import optuna
from filelock import FileLock
from optuna.trial import TrialState

from cola_hf.config import RunOptions
from cola_hf.errors import Refused, StoppedBySignal, UsageError
from cola_hf.studies.search.best import finish_best
from cola_hf.studies.search.report import write_reports
from cola_hf.studies.search.space import SearchSpace, load_space
from cola_hf.studies.search.storage import describe_storage, open_storage, study_lock
from cola_hf.studies.search.study import (
    SEARCH_DIR,
    Search,
    best_trial,
    check_same_search,
    claim_best,
    claim_output_dir,
    discard_models,
    fail_interrupted_trials,
    has_free_slot,
    make_pruner,
    make_sampler,
    record_output_dir,
    retry_trial,
    running_trials,
    study_finished,
)
from cola_hf.studies.search.trial import TrialObjective, recipe_options

logger = logging.getLogger(__name__)


def run_search(options: RunOptions, tokenized_files: datasets.DatasetDict | None = None) -> dict:
    """The worker: run trials until the study holds --n_trials of them and none is running, then report (and
    build best/, if this worker is the one to).

    `tokenized_files` (read_cola's files after run.tokenize_files, for `options`) saves this worker tokenizing
    them. Returns the search's summary (search/summary.json).
    """
    search = join_study(options, tokenized_files)
    run_trials(search)
    study = search.study
    logger.info("This worker ran trials %s; the study holds %d", search.trials_run, len(study.get_trials()))
    with search.lock:
        discard_models(search)
        best = best_trial(search)
        build_from = claim_best(search, best) if best is not None and study_finished(search) else None
        best_options = None if best is None else recipe_options(search, search.space.option_values(best.params))
        summary = write_reports(search, best, best_options)
        if build_from is not None:
            finish_best(search, best, build_from)
    return summary


def join_study(options: RunOptions, tokenized_files: datasets.DatasetDict | None = None) -> Search:
    """This worker's view of the study its options name, creating the study if it is the first worker."""
    study_args = options.study
    if options.training.world_size > 1:
        raise Refused("--search runs every trial in one process; start one worker per GPU instead")
    check_heartbeat(study_args.search_heartbeat_interval, study_args.search_grace_period)
    grid_alias = bool(study_args.grid)
    try:
        space = load_space(study_args.grid or study_args.search, method="grid" if grid_alias else None)
    except UsageError as err:  # a bad sweep file: refused before the search takes its directory
        raise Refused(str(err)) from err
    n_trials = resolve_n_trials(study_args.n_trials, space)
    output_dir = Path(options.training.output_dir)
    search_dir = output_dir / SEARCH_DIR
    search_dir.mkdir(parents=True, exist_ok=True)
    try:
        storage = open_storage(
            study_args.search_storage, search_dir, study_args.search_heartbeat_interval, study_args.search_grace_period
        )
    except UsageError as err:  # a storage it cannot open: refused before the search takes its directory
        raise Refused(str(err)) from err
    group = options.tracking.experiment_name or f"{options.recipe}-{space.path.stem}"
    shared = study_lock(study_args.search_storage, group, search_dir)
    lock = FileLock(str(search_dir / "search.lock"))
    # Under this directory's lock (its trials/ and best/ are one study's) and the study's: of two workers that start
    # a study with different sweep files or recipes, one creates it and records them, and the other is refused.
    with lock, shared:
        claim_output_dir(options, group, space, storage)
        study = optuna.create_study(
            study_name=group, storage=storage, direction=space.objective.direction, load_if_exists=True
        )
        check_same_search(study, space, options)
        record_output_dir(options, group, space)
        worker = study.user_attrs.get("workers_started", 0)
        study.set_user_attr("workers_started", worker + 1)
    # Each worker draws from its own random stream (the run's seed + its start order): two workers started
    # together must not draw the same random trials, and a lone worker's search is reproducible.
    study.sampler = make_sampler(space, options.training.seed + worker, n_trials)
    study.pruner = make_pruner(study_args.search_pruner, space, options)
    search = Search(options, space, n_trials, study, group, shared, lock)
    if tokenized_files is not None:
        search.files_cache[options.tokenization_key()] = tokenized_files
    logger.info(
        "Search %s: %s over %s (%d parameters), %d trials in total, pruner %s; storage %s",
        group,
        space.method,
        space.path,
        len(space.parameters),
        n_trials,
        study_args.search_pruner,
        describe_storage(study_args.search_storage, search_dir),
    )
    return search


def check_heartbeat(interval: int, grace: int) -> None:
    if interval < 1 or grace <= interval:
        raise Refused(
            f"--search_heartbeat_interval {interval} and --search_grace_period {grace}: the interval must be at least "
            "1 s and the grace period longer than it (a live worker must get a heartbeat in before it runs out)"
        )


def resolve_n_trials(n_trials: int | None, space: SearchSpace) -> int:
    if n_trials is not None and n_trials < 1:
        raise Refused(f"--n_trials must be at least 1, found {n_trials}")
    if space.method == "grid":
        size = space.grid_size()
        if n_trials is not None and n_trials > size:
            logger.info("--n_trials %d is more than the grid's %d points: each point runs once", n_trials, size)
        return min(n_trials or size, size)
    if n_trials is None:
        raise Refused(f"--search {space.path}: a {space.method} search needs --n_trials N (its total of trials)")
    return n_trials


# --- the worker loop -------------------------------------------------------------------------------------------
# A worker with no slot left looks this often whether the trials still running have ended or lost their worker.
WAIT_POLL_S = 5


def run_trials(search: Search) -> None:
    """Take a free slot, run a trial in it, repeat; when every slot of --n_trials is taken, wait for the trials
    of other workers to end, taking over any whose worker dies; return when the study is finished.

    A slot is taken by every trial except an interrupted one that is queued to run again: so finished, pruned
    and failed trials count, and N workers together run N trials, not N x n. Counting the slots and creating the
    trial happen under the study's lock (let go once the trial's directory is locked), which lives where the
    study does (storage.py): workers never take the same last slot, on one machine or many.
    """
    study = search.study
    waiting_for: list[int] = []
    while True:
        started = time.perf_counter()
        running: list[int] = []
        with contextlib.ExitStack() as held:  # the trial directory's lock, until Optuna has recorded the trial
            objective = TrialObjective(search, held)
            search.study_lock.acquire()
            try:
                fail_interrupted_trials(search)
                if has_free_slot(search):
                    with warnings.catch_warnings(), without_stop_tracebacks():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        # One trial per call: Optuna asks, keeps the heartbeat, records the state, logs the result.
                        study.optimize(objective, n_trials=1, catch=())
                else:
                    running = [trial.number for trial in running_trials(study)]
                    if not running:
                        break
            except (KeyboardInterrupt, StoppedBySignal):
                # Optuna recorded the trial as failed; queue it again, so the same command redoes it.
                if objective.trial_number is not None:
                    with search.study_lock:
                        retry_trial(study, objective.trial_number)
                    logger.info("Trial %d stopped; it is queued to run again from its start", objective.trial_number)
                raise
            except (AssertionError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
                # How optimize ends when the trial it is recording was failed by another worker meanwhile: this
                # worker's heartbeat had stopped for longer than the grace period (a paused process, a network cut).
                if not failed_by_another_worker(search, objective.trial_number):
                    raise
            finally:
                if search.study_lock.is_locked:
                    search.study_lock.release()
                search.bookkeeping_s += time.perf_counter() - started - objective.wall_s
        if running:
            if running != waiting_for:
                logger.info(
                    "No trial left to take; waiting for trials %s of other workers to end (one whose worker dies "
                    "is run again here)",
                    ", ".join(map(str, running)),
                )
                waiting_for = running
            waited = time.perf_counter()
            time.sleep(min(WAIT_POLL_S, search.options.study.search_heartbeat_interval))
            search.waiting_s += time.perf_counter() - waited
            continue
        waiting_for = []
        with search.lock:
            discard_models(search)
        search.trials_run.append(objective.trial_number)


class _DropStopTracebacks(logging.Filter):
    """Optuna logs the exception that ended a trial with its traceback, then "Trial N failed with value None". A
    stop on a signal is no failure of the trial: it is queued again, and the command says so in its own line
    ("stopped by SIGTERM ...; run the same command to continue")."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped_trial: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        raised = record.exc_info[1] if record.exc_info else None
        if isinstance(raised, StoppedBySignal | KeyboardInterrupt):
            self.stopped_trial = record.getMessage().split(" failed ")[0]  # "Trial N"
            return False
        return self.stopped_trial is None or not record.getMessage().startswith(f"{self.stopped_trial} failed ")


@contextlib.contextmanager
def without_stop_tracebacks() -> Iterator[None]:
    optimize_logger = logging.getLogger("optuna.study._optimize")  # where Optuna logs how each trial ended
    dropped = _DropStopTracebacks()
    optimize_logger.addFilter(dropped)
    try:
        yield
    finally:
        optimize_logger.removeFilter(dropped)


def failed_by_another_worker(search: Search, number: int | None) -> bool:
    if number is None or search.study.get_trials(deepcopy=False)[number].state != TrialState.FAIL:
        return False
    logger.warning(
        "Trial %d was failed by another worker while this one ran it (no heartbeat from here for "
        "--search_grace_period %d s): its result is not recorded, and its retry runs it again",
        number,
        search.options.study.search_grace_period,
    )
    return True
