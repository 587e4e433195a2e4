"""`--search SWEEP.yaml --n_trials N`: an Optuna study over a W&B sweep file's space, and the best model back.

    OUTPUT_DIR/search/     study.journal (the study), trials.csv/.md, best_params.yaml, plots, overhead.md
    OUTPUT_DIR/trials/     trial-000, trial-001, ...: each trial's epochs, results.json (no test sets), W&B run
    OUTPUT_DIR/best/       a normal run's complete outputs for the best trial's best epoch, model included

Why not `Trainer.hyperparameter_search`: it is the same Optuna underneath, but it scores a trial by its LAST
evaluation (`trainer.objective` is overwritten every epoch), keeps no trial's model (`best_model_checkpoint`
ends up naming the last trial's), re-initialises the model through `model_init` on one shared Trainer, sets
hyperparameters with `setattr` on live TrainingArguments (our batch layout is derived in `__post_init__`, so a
new global batch would not take), and runs `study.optimize(n_trials=...)` per process, so two workers run 2 x n.
What is taken from it: the pruning protocol (report the epoch's value, ask `should_prune`), and Optuna
itself for the samplers, pruners, storage, stale-trial retry and plots.

A trial is one `run`'s first half (data, model, Trainer, training) with `load_best_model_at_end` on validation
MCC, on the training and validation splits only: the test sets are not even handed to a trial's Trainer.
Its objective is the best validation MCC over its epochs. Only the best trial's best-epoch model stays on disk;
after the last trial, `best/` gets the second half of a run (test sets, reports, card, results.json) for it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import optuna
from filelock import FileLock
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from transformers import TrainerCallback, TrainerState

from cola_hf import data, reporting, search_report, tracking
from cola_hf import run as runner
from cola_hf.config import RunOptions, make_parser
from cola_hf.errors import RunFailed, StoppedBySignal, UsageError, one_line
from cola_hf.output_dir import hold_output_dir, is_held
from cola_hf.preemption import handling_sigterm
from cola_hf.results import RunResults
from cola_hf.search_space import SearchSpace, load_space
from cola_hf.trainer import build_trainer, load_model_and_tokenizer

logger = logging.getLogger(__name__)

SEARCH_DIR, TRIALS_DIR, BEST_DIR = "search", "trials", "best"
JOURNAL_FILE = "study.journal"
MODEL_DIR = "model"  # inside a trial directory: its best-epoch model, kept while it is the study's best
# A trial is chosen by its best epoch, so a run of its recipe must keep its best epoch too (best_params.yaml).
SELECT_BEST_EPOCH = {
    "load_best_model_at_end": True,
    "metric_for_best_model": "matthews_correlation",
    "greater_is_better": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
}
# An interrupted trial is run again with the same parameters at most this often (then it counts as failed).
MAX_RETRIES = 2
# Only for storages given by URL (several machines): a worker that stops beating for GRACE_S is failed.
HEARTBEAT_S, GRACE_S = 60, 300


@dataclass
class Search:
    """One worker's view of the study: what it searches, where, and its own bookkeeping time."""

    options: RunOptions
    space: SearchSpace
    n_trials: int
    study: optuna.Study
    group: str
    lock: FileLock
    # Tokenized CoLA files by what tokenizing depends on: one entry unless the space varies one of those.
    tokenized: dict[tuple, datasets.DatasetDict] = field(default_factory=dict)
    bookkeeping_s: float = 0.0
    data_s: float = 0.0
    trials_run: list[int] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.options.training.output_dir)

    def trial_dir(self, number: int) -> Path:
        return self.output_dir / TRIALS_DIR / f"trial-{number:03d}"


# --- the study -------------------------------------------------------------------------------------------------
def run_search(options: RunOptions, tokenized_files: datasets.DatasetDict | None = None) -> dict:
    """The worker: run trials until the study holds --n_trials of them, then report (and build best/, if last).

    `tokenized_files` (read_cola's files after tokenize_files, for `options`) saves this worker tokenizing them.
    Returns the search's summary (search/summary.json).
    """
    study_args = options.study
    if options.training.world_size > 1:
        raise UsageError("--search runs every trial in one process; start one worker per GPU instead")
    grid_alias = bool(study_args.grid)
    space = load_space(study_args.grid or study_args.search, make_parser(), method="grid" if grid_alias else None)
    n_trials = resolve_n_trials(study_args.n_trials, space)
    output_dir = Path(options.training.output_dir)
    search_dir = output_dir / SEARCH_DIR
    search_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(study_args.search_storage, search_dir)
    group = options.tracking.experiment_name or f"{options.recipe}-{space.path.stem}"
    lock = FileLock(str(search_dir / "search.lock"))
    with lock:
        study = optuna.create_study(study_name=group, storage=storage, direction="maximize", load_if_exists=True)
        check_same_search(study, space)
        worker = study.user_attrs.get("workers_started", 0)
        study.set_user_attr("workers_started", worker + 1)
    # Each worker draws from its own random stream (the run's seed + its start order): two workers started
    # together must not draw the same random trials, and a lone worker's search is reproducible.
    study.sampler = make_sampler(space, options.training.seed + worker, n_trials)
    study.pruner = make_pruner(study_args.search_pruner, space, options)
    search = Search(options, space, n_trials, study, group, lock)
    if tokenized_files is not None:
        search.tokenized[tokenization_key(options)] = tokenized_files
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
    run_trials(search)
    logger.info("This worker ran trials %s; the study holds %d", search.trials_run, len(study.get_trials()))
    with lock:
        best = best_trial(study)
        best_options = None if best is None else study_options(search, space.option_values(best.params))
        summary = search_report.write_reports(search, best, best_options)
        if study_finished(search):
            finish_best(search)
    return summary


def resolve_n_trials(n_trials: int | None, space: SearchSpace) -> int:
    if n_trials is not None and n_trials < 1:
        raise UsageError(f"--n_trials must be at least 1, found {n_trials}")
    if space.method == "grid":
        size = space.grid_size()
        if n_trials is not None and n_trials > size:
            logger.info("--n_trials %d is more than the grid's %d points: each point runs once", n_trials, size)
        return min(n_trials or size, size)
    if n_trials is None:
        raise UsageError(f"--search {space.path}: a {space.method} search needs --n_trials N (its total of trials)")
    return n_trials


def open_storage(url: str | None, search_dir: Path) -> BaseStorage:
    """The study's storage: a journal file in OUTPUT_DIR by default, or an Optuna RDB storage URL.

    Why a journal file, not SQLite, by default: Optuna recommends its JournalStorage for several processes on
    one machine without a database server (SQLite serialises writers with file locks and answers a busy
    database with "database is locked" errors); it is an append-only log, so a worker killed mid-write costs
    at most its own last line; and it works on NFS, where SQLite's locking does not, so workers on several
    machines can share an OUTPUT_DIR on a shared file system too. A URL (postgresql://, mysql://, sqlite://)
    gets Optuna's RDBStorage with heartbeats, so a machine that dies is noticed by the others.
    """
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
    if url is None:
        return str(search_dir / JOURNAL_FILE)
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1] if "@" in url else url  # never print a password


def check_same_search(study: optuna.Study, space: SearchSpace) -> None:
    """A resumed study must search the same space: trials from another space would mislead the sampler."""
    fingerprint = space.fingerprint()
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", fingerprint)
    elif stored != fingerprint:
        raise UsageError(
            f"study '{study.study_name}' in this storage searched another space than {space.path}; "
            "pass another --output_dir (or --experiment_name with --search_storage)"
        )


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


# --- the worker loop -------------------------------------------------------------------------------------------
def run_trials(search: Search) -> None:
    """Take a free slot, run a trial in it, repeat; stop when every slot of --n_trials is taken.

    A slot is taken by every trial except an interrupted one that is queued to run again: so finished,
    pruned and failed trials count, and N workers together run N trials, not N x n. Counting the slots and
    creating the trial happen under one file lock (let go once the trial's directory is locked), so two
    workers never take the same last slot.
    """
    study = search.study
    while True:
        started = time.perf_counter()
        objective = TrialObjective(search)
        search.lock.acquire()
        try:
            fail_interrupted_trials(search)
            if not has_free_slot(search):
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # One trial per call: Optuna asks, keeps the heartbeat, records the state and logs the result.
                study.optimize(objective, n_trials=1, catch=())
        except (KeyboardInterrupt, StoppedBySignal):
            # Optuna recorded the trial as failed; queue it again, so the same command redoes it.
            if objective.trial_number is not None:
                with search.lock:
                    retry_trial(study, objective.trial_number)
            raise
        finally:
            if search.lock.is_locked:
                search.lock.release()
            search.bookkeeping_s += time.perf_counter() - started - objective.wall_s
        with search.lock:
            discard_models(search)
        search.trials_run.append(objective.trial_number)


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


def fail_interrupted_trials(search: Search) -> None:
    """Fail every RUNNING trial whose worker is gone, and queue it to run again with the same parameters.

    A worker holds its trial directory's lock for the whole trial, and the kernel drops the lock of a killed
    process, so a RUNNING trial whose directory lock is free has lost its worker. Trials whose directory is
    not here (run by another machine) are left to the storage's heartbeat.
    """
    study = search.study
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_dir = search.trial_dir(trial.number)
        if not trial_dir.is_dir():
            continue
        if is_held(trial_dir):
            continue  # its worker is alive
        logger.warning("Trial %d was interrupted (its worker is gone): recorded as failed, queued again", trial.number)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        retry_trial(study, trial.number)


def retry_trial(study: optuna.Study, number: int) -> None:
    """Queue an interrupted trial again with its parameters (Optuna's own stale-trial retry)."""
    (frozen,) = [trial for trial in study.get_trials(deepcopy=True) if trial.number == number]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, frozen)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best finished trial; among equals, the first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda trial: (trial.value, -trial.number), default=None)


def discard_models(search: Search) -> None:
    """Keep disk bounded: only the best trial's model stays; checkpoints of trials that stopped go too."""
    best = best_trial(search.study)
    for trial in search.study.get_trials(deepcopy=False):
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


# --- one trial -------------------------------------------------------------------------------------------------
class TrialObjective:
    """Optuna's objective for one trial: its directory locked, the search lock let go, then `run_trial`."""

    def __init__(self, search: Search) -> None:
        self.search = search
        self.trial_number: int | None = None
        self.wall_s = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_number = trial.number
        started = time.perf_counter()
        trial_dir = self.search.trial_dir(trial.number)
        try:
            with hold_output_dir(trial_dir):  # the same lock as any run's: one worker per trial directory
                # The trial exists and its directory is locked: other workers may now count slots and ask.
                self.search.lock.release()
                return run_trial(self.search, trial, trial_dir)
        finally:
            self.wall_s = time.perf_counter() - started


class ReportEpochs(TrainerCallback):
    """After each validation: report the trial's best MCC so far to Optuna, stop the trial if it says prune.

    The value reported is the best so far, not the epoch's own: the objective is the best epoch, so a trial
    whose MCC dips for one epoch is compared on what it has already reached. The last epoch is never pruned:
    it saves nothing, and would drop a finished trial from the ranking.
    """

    def __init__(self, trial: optuna.Trial, last_epoch: int) -> None:
        self.trial = trial
        self.last_epoch = last_epoch
        self.best = -math.inf
        self.pruned_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        mcc = (metrics or {}).get("eval_matthews_correlation")
        if mcc is None or state.epoch is None:
            return
        epoch = round(state.epoch)
        self.best = max(self.best, mcc)
        self.trial.report(self.best, epoch)
        if epoch < self.last_epoch and self.trial.should_prune():
            self.pruned_at = epoch
            control.should_training_stop = True
            control.should_save = False  # a pruned trial's model is never kept


def study_options(search: Search, changes: dict[str, Any]) -> RunOptions:
    """The options of a run of the recipe with `changes`, as best_params.yaml spells it out."""
    return search.options.replace(**changes, **SELECT_BEST_EPOCH)


def trial_options(search: Search, changes: dict[str, Any], output_dir: Path, run_name: str) -> RunOptions:
    """The base options with the trial's parameters, selecting its best epoch, in its own directory."""
    try:
        return search.options.replace(
            **changes,
            **SELECT_BEST_EPOCH,
            # Only the weights in each epoch's checkpoint: the optimizer state is for resuming, and an
            # interrupted trial is run again from the start.
            save_only_model=True,
            save_total_limit=1,
            output_dir=str(output_dir),
            run_name=run_name,
            overwrite_output_dir=False,
            resume=False,
            push_to_hub=False,
            experiment_name=search.group,
            search=None,
            grid=None,
            seeds=None,
        )
    except ValueError as err:  # TrainingArguments refuses a combination of values
        raise UsageError(f"--search {search.space.path}: {' '.join(str(err).split())}") from err


def run_trial(search: Search, trial: optuna.Trial, trial_dir: Path) -> float:
    """Train one trial; return its best validation MCC (nan, recorded as failed, if training diverged)."""
    changes = search.space.suggest(trial)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("output_dir", str(trial_dir))
    options = trial_options(search, changes, trial_dir, f"{search.group}-trial-{trial.number:03d}")
    logger.info("Trial %d: %s", trial.number, ", ".join(f"{name}={value}" for name, value in changes.items()))
    timer = time.perf_counter()
    model, tokenizer = runner.load_model(options)
    files = tokenized_files(search, options, tokenizer)
    splits = runner.split_data(options, files)
    # Training and validation only: a trial's Trainer cannot score a test set, it never sees one.
    splits = datasets.DatasetDict(train=splits["train"], validation=splits["validation"])
    reporter = ReportEpochs(trial, last_epoch=math.ceil(options.training.num_train_epochs))
    trainer = build_trainer(options, splits, model, tokenizer, callbacks=[reporter])
    tracking.start_run(trainer, options, data.file_hashes(files))
    setup_s = time.perf_counter() - timer

    timer = time.perf_counter()
    try:
        with handling_sigterm(trainer):  # SIGTERM: the trial stops, is queued again, the worker exits 75
            trainer.train()
    except RunFailed as err:  # diverged: these parameters fail, the search goes on
        trial.set_user_attr("error", str(err))
        logger.warning("Trial %d failed: %s", trial.number, err)
        tracking.log_run_outputs(trial_dir, RunResults(epochs=reporting.epoch_table(trainer.state.log_history)))
        remove_checkpoints(trial_dir)
        return math.nan
    train_s = time.perf_counter() - timer

    timer = time.perf_counter()
    epochs = reporting.epoch_table(trainer.state.log_history)
    scored = [row for row in epochs if row.valid_mcc is not None]
    best = max(scored, key=lambda row: row.valid_mcc)  # the first of equals, like the Trainer's best checkpoint
    epochs_s = sum((row.training_time_s or 0) + (row.validation_time_s or 0) for row in epochs)
    for name, value in {
        "best_epoch": best.epoch,
        "epochs_run": len(epochs),
        "training_time_s": sum(row.training_time_s or 0 for row in epochs),
        "pruned_at": reporter.pruned_at,
    }.items():
        trial.set_user_attr(name, value)
    if reporter.pruned_at is None:
        keep_if_best(search, trainer, trial_dir, best.valid_mcc)
    trainer.save_state()  # trainer_state.json: the log history best/ reports the epochs from
    remove_checkpoints(trial_dir)
    config = options.config()
    config["search"] = {"trial": trial.number, "best_valid_mcc": best.valid_mcc, "best_epoch": best.epoch}
    results = RunResults(epochs=epochs, config=config)
    if epochs:
        reporting.write_epoch_outputs(trial_dir, epochs)
    reporting.write_results(trial_dir, results)
    tracking.log_run_outputs(trial_dir, results)
    for name, value in {
        "setup_s": setup_s,
        "train_s": train_s,
        "epochs_s": epochs_s,
        "finish_s": time.perf_counter() - timer,
    }.items():
        trial.set_user_attr(name, value)
    if reporter.pruned_at is not None:
        logger.info(
            "Trial %d pruned after epoch %d (best validation MCC %.4f)", trial.number, reporter.pruned_at, reporter.best
        )
        raise optuna.TrialPruned(f"after epoch {reporter.pruned_at}")
    return best.valid_mcc


def tokenized_files(search: Search, options: RunOptions, tokenizer: Any) -> datasets.DatasetDict:
    """The CoLA files tokenized for `options`, once per worker: every trial splits the same tokenized files."""
    key = tokenization_key(options)
    if key not in search.tokenized:
        started = time.perf_counter()
        raw = data.read_cola(options.data.cola_source)
        search.tokenized[key] = runner.tokenize_files(options, raw, tokenizer)
        search.data_s += time.perf_counter() - started
    return search.tokenized[key]


def tokenization_key(options: RunOptions) -> tuple:
    return (
        options.model.model_name_or_path,
        options.data.cola_source,
        options.data.max_seq_length,
        options.data.pad_to_max_length,
    )


def keep_if_best(search: Search, trainer: Any, trial_dir: Path, value: float) -> None:
    """Save the trial's best-epoch model (loaded back by the Trainer) if it beats the study's best so far."""
    with search.lock:
        best = best_trial(search.study)
    if best is None or value > best.value:
        trainer.save_model(str(trial_dir / MODEL_DIR))


# --- the best trial --------------------------------------------------------------------------------------------
def finish_best(search: Search) -> RunResults | None:
    """OUTPUT_DIR/best/: the best trial's model, scored on the test sets and reported like any run."""
    best = best_trial(search.study)
    if best is None:
        logger.warning("No trial finished: nothing to put in %s", search.output_dir / BEST_DIR)
        return None
    best_dir = search.output_dir / BEST_DIR
    if is_current_best(best_dir, best.number):
        return None
    model_dir = search.trial_dir(best.number) / MODEL_DIR
    if not model_dir.is_dir():
        where = best.user_attrs.get("host") or "another worker"
        logger.warning("The best trial, %d, keeps its model on %s: best/ is written there", best.number, where)
        return None
    if best_dir.exists():
        shutil.rmtree(best_dir)  # an earlier best's outputs
    changes = search.space.option_values(best.params)
    options = trial_options(search, changes, best_dir, f"{search.group}-best")
    link_or_copy_tree(model_dir, best_dir)
    model, tokenizer = load_model_and_tokenizer(str(best_dir), trust_remote_code=options.model.trust_remote_code)
    files = tokenized_files(search, options, tokenizer)
    splits = runner.split_data(options, files)
    trainer = build_trainer(options, splits, model, tokenizer)
    state = TrainerState.load_from_json(str(search.trial_dir(best.number) / "trainer_state.json"))
    trainer.state.log_history = state.log_history  # the best trial's epochs, for the reports and the card
    tracking.start_run(trainer, options, data.file_hashes(files))
    predictions = runner.predict_splits(trainer, splits)
    results = runner.finish_run(trainer, options, splits, predictions, runner.check_annotations(options))
    if results is None:
        return None
    # After the run's own results.json: best/ counts as built only once it names its trial (is_current_best).
    results.config["search"] = {
        "sweep": str(search.space.path),
        "method": search.space.method,
        "study": search.study.study_name,
        "trial": best.number,
        "best_valid_mcc": best.value,
        "best_epoch": best.user_attrs.get("best_epoch"),
        "params": changes,
        "n_trials": search.n_trials,
    }
    search_report.add_search_to_card(best_dir, search, best)
    reporting.write_results(best_dir, results)
    logger.info(
        "Best trial %d (validation MCC %.4f): its model and test results are in %s", best.number, best.value, best_dir
    )
    return results


def is_current_best(best_dir: Path, number: int) -> bool:
    try:
        results = RunResults.load(best_dir)
    except UsageError:
        return False
    return (results.config.get("search") or {}).get("trial") == number and (best_dir / "README.md").is_file()


def link_or_copy_tree(source: Path, target: Path) -> None:
    """Hard links where the file system allows (no second copy of the weights on disk), else copies."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)
