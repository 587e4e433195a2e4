"""A worker's view of a search's study, and what every part of the search asks of it: which slots are taken,
which trials lost their worker, which is best, who builds best/, what stays on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from cola_hf.config import RunOptions
from cola_hf.errors import Refused
from cola_hf.file_io import write_json
from cola_hf.run import FilesCache
from cola_hf.studies.search.space import SearchSpace
from cola_hf.studies.search.storage import (
    JOURNAL_FILE,
    MAX_RETRIES,
    STUDY_LOCK_FILE,
    StudyLock,
    trials_never_beating,
)
from cola_hf.training.output_dir import is_held

logger = logging.getLogger(__name__)

SEARCH_DIR, TRIALS_DIR, BEST_DIR = "search", "trials", "best"
MODEL_DIR = "model"  # inside a trial directory: its best-epoch model, kept while it is the study's best
STUDY_RECORD = "study.json"  # in OUTPUT_DIR/search: the one study this directory's trials/ and best/ belong to


@dataclass
class Search:
    """One worker's view of the study: what it searches, where, and its own bookkeeping time."""

    options: RunOptions
    space: SearchSpace
    n_trials: int
    study: optuna.Study
    group: str
    # Two locks: the study's, wherever the study lives (slots, new trials, failing dead ones, claiming best/), and
    # this OUTPUT_DIR's (its reports, models and best/, which workers sharing the directory write in turn).
    study_lock: StudyLock
    lock: FileLock
    # Tokenized CoLA files by what tokenizing depends on: one entry unless the space varies one of those.
    files_cache: FilesCache = field(default_factory=dict)
    bookkeeping_s: float = 0.0
    data_s: float = 0.0
    waiting_s: float = 0.0  # for the trials of other workers, with no slot left to take
    trials_run: list[int] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.options.training.output_dir)

    @property
    def search_dir(self) -> Path:
        return self.output_dir / SEARCH_DIR

    def trial_dir(self, number: int) -> Path:
        return self.output_dir / TRIALS_DIR / f"trial-{number:03d}"


@contextlib.contextmanager
def timed(seconds: dict[str, float], part: str) -> Iterator[None]:
    """Add the time spent inside to `seconds[part]`: the search's accounting of where its time goes."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started


# --- the study's set-up ------------------------------------------------------------------------------------------
def claim_output_dir(options: RunOptions, group: str, space: SearchSpace, storage: BaseStorage) -> None:
    """OUTPUT_DIR holds one study (its trials/ and best/ are that study's): another one there is refused, naming
    both, unless --overwrite_output_dir, which clears the directory's search and deletes its previous study."""
    output_dir = Path(options.training.output_dir)
    record_path = output_dir / SEARCH_DIR / STUDY_RECORD
    try:
        recorded = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if options.training.overwrite_output_dir:
        names = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
        for name in {group, (recorded or {}).get("study")} & names:
            # Other workers may share the study (a job array given the same command): not while they run trials.
            running = optuna.load_study(study_name=name, storage=storage).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,)
            )
            if running:
                numbers = ", ".join(str(trial.number) for trial in running)
                raise Refused(
                    f"--overwrite_output_dir: study '{name}' has trials running ({numbers}); stop its workers first "
                    "(or, to join it, leave --overwrite_output_dir out)"
                )
            optuna.delete_study(study_name=name, storage=storage)
        for folder in (TRIALS_DIR, BEST_DIR):
            shutil.rmtree(output_dir / folder, ignore_errors=True)
        for path in (output_dir / SEARCH_DIR).iterdir():
            if path.name not in ("search.lock", STUDY_LOCK_FILE, JOURNAL_FILE):  # all in use by this worker
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif recorded is not None and recorded.get("study") != group:
        raise Refused(
            f"{output_dir}: holds the search '{recorded.get('study')}' ({recorded.get('sweep')}); this one is "
            f"'{group}' ({space.path}): pass another --output_dir, or --overwrite_output_dir to replace it"
        )


def record_output_dir(options: RunOptions, group: str, space: SearchSpace) -> None:
    """Record the study OUTPUT_DIR holds: once nothing refused it (claim_output_dir, check_same_search)."""
    write_json(
        Path(options.training.output_dir) / SEARCH_DIR / STUDY_RECORD, {"study": group, "sweep": str(space.path)}
    )


def check_same_search(study: optuna.Study, space: SearchSpace, options: RunOptions) -> None:
    """A resumed study must search the same space from the same recipe for the same objective: trials of another
    space would mislead the sampler, and trials of another base recipe (a model, a sequence length) or scored by
    another objective would not be comparable."""
    searched = set(space.parameters)
    recipe = {name: value for name, value in options.trajectory().items() if name not in searched}
    objective = {"metric": space.objective.metric, "direction": space.objective.direction}
    # A study recorded before studies recorded their objective: the direction Optuna stored is all there is, and
    # Optuna keeps it whatever a resumed study is asked for.
    unrecorded = {**objective, "direction": study.direction.name.lower()}
    older = "space" in study.user_attrs and "objective" not in study.user_attrs
    checked = (
        ("space", space.fingerprint(), "space"),
        ("recipe", recipe, "recipe"),
        ("objective", objective, "objective"),
    )
    # Every check before anything is recorded: a refused worker leaves the study as it found it.
    for attribute, now, what in checked:
        stored = unrecorded if attribute == "objective" and older else study.user_attrs.get(attribute)
        if stored is not None and stored != now:
            changed = sorted(key for key in {*stored, *now} if stored.get(key) != now.get(key))
            raise Refused(
                f"study '{study.study_name}' in this storage searched another {what} than {space.path} with "
                f"these options ({', '.join(changed)} differ); pass another --output_dir (or --experiment_name "
                "with --search_storage), or --overwrite_output_dir to start over"
            )
    for attribute, now, _ in checked:
        if attribute not in study.user_attrs:
            study.set_user_attr(attribute, now)


def make_sampler(space: SearchSpace, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    if space.method == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if space.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            # Optuna's default of 10 random trials before TPE would spend most of a 16-trial budget at random.
            n_startup_trials=min(10, max(4, n_trials // 3)),
            # Learning rate, epochs and batch size act together: model them jointly, not one by one.
            multivariate=True,
            # Workers sharing the study see running trials as if finished badly: no two try the same point.
            constant_liar=True,
        )


def make_pruner(name: str, space: SearchSpace, options: RunOptions) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        epochs = space.parameters.get("num_train_epochs")
        most = epochs.upper_bound() if epochs else options.training.num_train_epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, math.ceil(most)))
    # Steps are epochs, from 1; the earliest prune is at epoch 2: a low learning rate can still be at chance
    # after one epoch and win later.
    return optuna.pruners.MedianPruner(n_warmup_steps=2)


# --- slots and the trials' states ------------------------------------------------------------------------
def has_free_slot(search: Search) -> bool:
    """A trial queued to run again has its slot already; otherwise a slot is free while fewer are taken."""
    if search.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    return slots_taken(search.study) < search.n_trials


def slots_taken(study: optuna.Study) -> int:
    trials = study.get_trials(deepcopy=False)
    retried = {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}
    return sum(trial.number not in retried for trial in trials)


def study_finished(search: Search) -> bool:
    trials = search.study.get_trials(deepcopy=False)
    active = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return not active and slots_taken(search.study) >= search.n_trials


def running_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials RUNNING now, as the storage has them (not a cached copy: it is read afresh)."""
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def fail_interrupted_trials(search: Search) -> None:
    """Fail every RUNNING trial whose worker is gone, and queue it to run again with the same parameters.

    Called under the study lock, as is every other failing of a trial. Two ways to tell that a worker is gone:
    - its trial directory's lock is free: a worker holds it from the trial's start until Optuna has recorded
      the trial's end, and the kernel drops the lock of a killed process. A free lock on a trial still RUNNING
      is read again, so that a trial recorded and let go by its worker between the two looks is left alone;
    - its heartbeat (an RDB storage, for trials whose directory is not here: another machine's): no heartbeat for
      --search_grace_period seconds. Optuna's own check fails the trial and queues it again.
    """
    study = search.study
    for trial in running_trials(study):
        trial_dir = search.trial_dir(trial.number)
        if not trial_dir.is_dir() or is_held(trial_dir):
            continue  # another machine's trial, or its worker is alive
        if trial.number not in {again.number for again in running_trials(study)}:
            continue  # recorded (finished) by its worker in the meantime
        logger.warning("Trial %d was interrupted (its worker is gone): recorded as failed, queued again", trial.number)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        retry_trial(study, trial.number)
    fail_silent_trials(search)


def fail_silent_trials(search: Search) -> None:
    """Optuna's heartbeat check (RDB storages): fail and queue again the trials whose worker stopped beating."""
    if search.options.study.search_storage is None:
        return  # the journal file keeps no heartbeats
    study = search.study
    before = {trial.number: trial for trial in running_trials(study)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for number in sorted(set(before) - {trial.number for trial in running_trials(study)}):
        trial = before[number]
        if study.get_trials(deepcopy=False)[number].state != TrialState.FAIL:
            continue  # finished by its worker meanwhile
        grace = search.options.study.search_grace_period
        where = f"pid {trial.user_attrs.get('pid', '?')} on {trial.user_attrs.get('host', '?')}"
        logger.warning(
            "Trial %d: no heartbeat from its worker (%s) for %d s: recorded as failed, queued again",
            number,
            where,
            grace,
        )
    fail_trials_never_beating(search)


def fail_trials_never_beating(search: Search) -> None:
    """Fail and queue again the RUNNING trials, not of this directory, that started longer than the grace period
    ago and never recorded a heartbeat: their worker died at their very start (storage.trials_never_beating)."""
    study, grace = search.study, search.options.study.search_grace_period
    now = datetime.now()  # the clock Optuna's RDB storage dates trials with (naive, the workers' own)
    started_long_ago = [
        trial.number
        for trial in running_trials(study)
        if trial.datetime_start is not None
        and (now - trial.datetime_start).total_seconds() > grace
        and not search.trial_dir(trial.number).is_dir()
    ]
    for number in trials_never_beating(search.options.study.search_storage, study.study_name, started_long_ago):
        logger.warning(
            "Trial %d started over %d s ago and never recorded a heartbeat (its worker died as it began): recorded "
            "as failed, queued again",
            number,
            grace,
        )
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        retry_trial(study, number)


def retry_trial(study: optuna.Study, number: int) -> None:
    """Queue an interrupted trial again with its parameters (Optuna's own stale-trial retry)."""
    (frozen,) = [trial for trial in study.get_trials(deepcopy=True) if trial.number == number]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, frozen)


def best_trial(search: Search, trials: Sequence[FrozenTrial] | None = None) -> FrozenTrial | None:
    """The best finished trial by the search's objective; among equals, the first by number. Of `trials`, one
    read of the study (a caller that acts on several trials reads it once), or of the study as it is now."""
    if trials is None:
        trials = search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = None
    for trial in trials:
        if trial.state == TrialState.COMPLETE and (
            best is None or search.space.objective.better(trial.value, best.value)
        ):
            best = trial
    return best


# The study's record of which worker builds best/ (user attribute): {"trial", "output_dir", "host"}.
BEST_BUILDER = "best_built_by"


def best_model_dir(search: Search, best: FrozenTrial) -> Path | None:
    """The directory of the best trial where this worker can read its model: its own trials/, or the directory
    the trial ran in (another worker's OUTPUT_DIR, on this machine or on a shared file system); else None."""
    ran_in = best.user_attrs.get("output_dir")
    for trial_dir in (search.trial_dir(best.number), Path(ran_in) if ran_in else None):
        if trial_dir is not None and (trial_dir / MODEL_DIR).is_dir():
            return trial_dir
    return None


def claim_best(search: Search, best: FrozenTrial) -> Path | None:
    """The trial directory to build best/ from, if this worker is the one to build it; else None.

    One best/ per study, built once: by the first worker that sees the study end and can read the best trial's
    model, which records the claim in the study (under the study lock), so that workers with other output
    directories leave it alone. A worker in the claimant's OUTPUT_DIR may build it again (a claimant killed
    mid-way: the same command finishes it).
    """
    trial_dir = best_model_dir(search, best)
    me = {"trial": best.number, "output_dir": str(search.output_dir.resolve()), "host": socket.gethostname()}
    with search.study_lock:
        builder = search.study.user_attrs.get(BEST_BUILDER)
        if trial_dir is not None and (builder is None or builder["trial"] != best.number):
            search.study.set_user_attr(BEST_BUILDER, me)
            return trial_dir
    if builder is not None and builder["trial"] == best.number:
        if builder["output_dir"] == me["output_dir"]:
            return trial_dir
        logger.info("best/ (trial %d) is built in %s on %s", best.number, builder["output_dir"], builder["host"])
        return None
    where = f"{best.user_attrs.get('output_dir', 'its directory')} on {best.user_attrs.get('host', 'another machine')}"
    logger.warning(
        "The best trial, %d, keeps its model in %s, which this worker cannot read: run the same command there "
        "to build best/",
        best.number,
        where,
    )
    return None


def discard_models(search: Search) -> None:
    """Keep disk bounded: only the best trial's model stays; checkpoints of trials that stopped go too."""
    # One read: a trial another worker records between two reads would be neither left alone as running nor
    # kept as the best it may be.
    trials = search.study.get_trials(deepcopy=False)
    best = best_trial(search, trials)
    for trial in trials:
        if trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        trial_dir = search.trial_dir(trial.number)
        if not trial_dir.is_dir():
            continue
        remove_checkpoints(trial_dir)
        if (best is None or trial.number != best.number) and (trial_dir / MODEL_DIR).is_dir():
            shutil.rmtree(trial_dir / MODEL_DIR)


def remove_checkpoints(trial_dir: Path) -> None:
    for checkpoint in trial_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
