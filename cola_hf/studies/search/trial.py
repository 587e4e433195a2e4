"""One trial of a search: its options, how it is scored, and how it runs (the run's prepare + fit + finish).

A trial is the first half of a run with `load_best_model_at_end` on the search's objective (objective.py,
validation MCC unless the sweep file names another), on the training and validation splits only: the test sets
are not even handed to a trial's Trainer. Its value is its best epoch's (`ReportEpochs` reports the best so far to
Optuna after every epoch, which may prune it). Only the best trial's best-epoch model stays on disk
(`keep_if_best`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from transformers import TrainerCallback

from cola_hf.config import RunOptions
from cola_hf.errors import RunFailed, UsageError
from cola_hf.integrations import tracking
from cola_hf.results import RunResults
from cola_hf.run import PreparedRun, finish, fit, prepare
from cola_hf.studies.search.objective import Objective
from cola_hf.studies.search.study import MODEL_DIR, Search, best_trial, remove_checkpoints, timed
from cola_hf.training.output_dir import hold_output_dir
from cola_hf.training.preemption import handling_sigterm
from cola_hf.training.trainer import epoch_table

logger = logging.getLogger(__name__)


class TrialObjective:
    """Optuna's objective for one trial: its directory locked, the study lock let go, then `run_trial`.

    The trial directory's lock goes into `held`, which the worker closes only after `study.optimize` returns, that
    is after Optuna has recorded the trial's end: a worker whose trial has returned but is not yet recorded must
    not look dead to the others (they fail a RUNNING trial whose directory lock is free).
    """

    def __init__(self, search: Search, held: contextlib.ExitStack) -> None:
        self.search = search
        self.held = held
        self.trial_number: int | None = None
        self.wall_s = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_number = trial.number
        started = time.perf_counter()
        trial_dir = self.search.trial_dir(trial.number)
        try:
            # The same lock as any run's: one worker per trial directory.
            self.held.enter_context(hold_output_dir(trial_dir))
            # The trial exists and its directory is locked: other workers may now count slots and ask.
            self.search.study_lock.release()
            return run_trial(self.search, trial, trial_dir)
        finally:
            self.wall_s = time.perf_counter() - started


class ReportEpochs(TrainerCallback):
    """After each validation: report the trial's best value so far to Optuna, stop the trial if it says prune.

    The value reported is the best so far, not the epoch's own: the objective is the best epoch, so a trial
    whose value dips for one epoch is compared on what it has already reached. The last epoch is never pruned:
    it saves nothing, and would drop a finished trial from the ranking.
    """

    def __init__(self, trial: optuna.Trial, objective: Objective, last_epoch: int) -> None:
        self.trial = trial
        self.objective = objective
        self.last_epoch = last_epoch
        self.best: float | None = None
        self.pruned_at: int | None = None
        # The storage refused the report: the trial was failed by another worker (no heartbeat from this one for
        # the grace period: a suspended process, a network cut) and is queued to run again. Training stops.
        self.taken_over = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = self.objective.of_evaluation(metrics)
        if value is None or state.epoch is None:
            return
        epoch = round(state.epoch)
        self.best = self.objective.best_so_far(self.best, value)
        try:
            self.trial.report(self.best, epoch)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.taken_over = True
            control.should_training_stop = True
            control.should_save = False
            return
        if epoch < self.last_epoch and self.trial.should_prune():
            self.pruned_at = epoch
            control.should_training_stop = True
            control.should_save = False  # a pruned trial's model is never kept


def recipe_options(search: Search, changes: dict[str, Any]) -> RunOptions:
    """The options of a run of the recipe with `changes`, as best_params.yaml spells it out."""
    return search.options.replace(**changes, **search.space.objective.trainer_options())


def trial_options(search: Search, changes: dict[str, Any], output_dir: Path, run_name: str) -> RunOptions:
    """The base options with the trial's parameters, selecting its best epoch, in its own directory."""
    try:
        return search.options.replace(
            **changes,
            **search.space.objective.trainer_options(),
            # Only the weights in each epoch's checkpoint: the optimizer state is for resuming, and an
            # interrupted trial is run again from the start.
            save_only_model=True,
            save_total_limit=1,
            output_dir=str(output_dir),
            run_name=run_name,
            overwrite_output_dir=False,
            resume=False,
            push_to_hub=False,
            log_model=False,  # a trial's model is not its directory's: best/ holds the one worth keeping
            experiment_name=search.group,
            search=None,
            grid=None,
            seeds=None,
        )
    except ValueError as err:  # TrainingArguments refuses a combination of values
        raise UsageError(f"--search {search.space.path}: {' '.join(str(err).split())}") from None


def end_unrecorded(prepared: PreparedRun, trial_dir: Path) -> float:
    """A trial that ends without a result (diverged, or failed by another worker): its epochs go to W&B, its
    checkpoints go; nan, which Optuna records as failed."""
    tracking.log_run_outputs(trial_dir, RunResults(epochs=epoch_table(prepared.trainer.state.log_history)))
    remove_checkpoints(trial_dir)
    return math.nan


def run_trial(search: Search, trial: optuna.Trial, trial_dir: Path) -> float:
    """Train one trial; return its best epoch's value (nan, recorded as failed, if training diverged)."""
    changes = search.space.suggest(trial)
    # Where the trial runs: for the reports, and for a worker elsewhere that builds best/ from its model.
    where = {"host": socket.gethostname(), "pid": os.getpid(), "output_dir": str(trial_dir.resolve())}
    for name, value in where.items():
        trial.set_user_attr(name, value)
    options = trial_options(search, changes, trial_dir, f"{search.group}-trial-{trial.number:03d}")
    logger.info("Trial %d: %s", trial.number, ", ".join(f"{name}={value}" for name, value in changes.items()))
    seconds: dict[str, float] = {}
    objective = search.space.objective
    reporter = ReportEpochs(trial, objective, last_epoch=math.ceil(options.training.num_train_epochs))
    with timed(seconds, "setup_s"):
        prepared = prepare(options, search.files_cache, test_sets=False, callbacks=[reporter])
    search.data_s += prepared.data_s
    seconds["setup_s"] -= prepared.data_s  # reading and tokenizing CoLA has its own line in overhead.md
    try:
        with timed(seconds, "train_s"), handling_sigterm(prepared.trainer):  # SIGTERM: queued again, exit 75
            fit(prepared, save_model=False)  # the best epoch's model is kept only if it is the study's best
    except RunFailed as err:  # diverged: these parameters fail, the search goes on
        trial.set_user_attr("error", str(err))
        logger.warning("Trial %d failed: %s", trial.number, err)
        return end_unrecorded(prepared, trial_dir)
    if reporter.taken_over:  # nothing of it is recorded: its rerun, elsewhere, is the trial (worker.py says so)
        return end_unrecorded(prepared, trial_dir)
    with timed(seconds, "finish_s"):
        best = record_trial(search, trial, prepared, reporter)
    for name, value in seconds.items():
        trial.set_user_attr(name, value)
    if reporter.pruned_at is not None:
        logger.info(
            "Trial %d pruned after epoch %d (best %s %.4f)",
            trial.number,
            reporter.pruned_at,
            objective.label,
            reporter.best,
        )
        raise optuna.TrialPruned(f"after epoch {reporter.pruned_at}")
    return best


def record_trial(search: Search, trial: optuna.Trial, prepared: PreparedRun, reporter: ReportEpochs) -> float:
    """What a trial reached, for Optuna and the trial's directory (epochs, results.json, W&B); its best epoch's
    value."""
    trainer, trial_dir = prepared.trainer, prepared.output_dir
    objective = search.space.objective
    epochs = epoch_table(trainer.state.log_history)
    best = objective.best_epoch(epochs)
    value = objective.of_epoch(best)
    trial.set_user_attr("epochs_s", sum((row.training_time_s or 0) + (row.validation_time_s or 0) for row in epochs))
    for name, attribute in {
        "best_epoch": best.epoch,
        "epochs_run": len(epochs),
        "training_time_s": sum(row.training_time_s or 0 for row in epochs),
        "pruned_at": reporter.pruned_at,
    }.items():
        trial.set_user_attr(name, attribute)
    if reporter.pruned_at is None:
        keep_if_best(search, trainer, trial_dir, value)
    remove_checkpoints(trial_dir)
    finish(prepared, None, search={"trial": trial.number, objective.value_name: value, "best_epoch": best.epoch})
    return value


def keep_if_best(search: Search, trainer: Any, trial_dir: Path, value: float) -> None:
    """Save the trial's best-epoch model (loaded back by the Trainer) unless the study holds a better trial. A tie
    saves too: the best of equals is the first by number, and a trial started earlier may end after its equal."""
    with search.lock:
        best = best_trial(search)
    if best is None or not search.space.objective.better(best.value, value):
        trainer.save_model(str(trial_dir / MODEL_DIR))
