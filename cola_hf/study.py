"""Many runs of one recipe: `--seeds` and `--per_run_output_dir` here; `--search` and `--grid` in cola_hf/search.py.

Every run is `cola_hf.run.run(options)`, called in this process with changed options, written to its own
sub-directory named after the run (OUTPUT_DIR/tutorial-lr2e-05-bs32-ep4-seed43), and tracked as its own W&B
run in one group. A run whose results.json exists is not run again and one with checkpoints continues from
the latest (cola_hf/output_dir.py), so an interrupted or preempted study picks up at the run it was in
(`--overwrite_output_dir` reruns everything).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cola_hf import compare
from cola_hf.config import RunOptions
from cola_hf.errors import UsageError
from cola_hf.output_dir import is_finished
from cola_hf.reporting import atomic_path, write_json, write_text
from cola_hf.results import RunResults

logger = logging.getLogger(__name__)

RunFunction = Callable[[RunOptions], "RunResults | None"]


@dataclass
class Trial:
    name: str
    output_dir: Path
    changes: dict[str, Any]
    results: RunResults


def run_study(run: RunFunction, options: RunOptions) -> Any:
    """One run, a seed study or a grid, as the study flags say."""
    study = options.study
    if study.seeds and study.grid:
        raise UsageError("--seeds and --grid: give one or the other (a grid runs with --seed)")
    if study.search and (study.seeds or study.grid):
        raise UsageError("--search with --seeds or --grid: give one (confirm a search's best_params.yaml over seeds)")
    if study.search or study.grid:
        # --grid FILE is --search FILE for a grid: one mechanism, an Optuna study. Imported here: the search
        # imports cola_hf.run, which imports this module.
        from cola_hf.search import run_search

        return run_search(options)
    if study.seeds:
        return run_seeds(run, options)
    if study.per_run_output_dir:
        options = trial_options(options, {})
    return run(options)


# --- one trial -----------------------------------------------------------------------------------------------
def trial_options(options: RunOptions, changes: dict[str, Any]) -> RunOptions:
    """The options of one run: `changes` applied, output_dir = OUTPUT_DIR/<run name>.

    An explicit --run_name stays the name of a single run; runs of a study are named by what they vary.
    """
    single = not changes
    trial = options.replace(**changes, **({} if single else {"run_name": None}))
    name = trial.run_name()
    args = trial.training
    args.output_dir = str(Path(options.training.output_dir) / name)
    args.run_name = name
    return trial


def run_trials(run: RunFunction, options: RunOptions, all_changes: list[dict[str, Any]], group: str) -> list[Trial]:
    """Run each set of changes in turn (skipping finished ones), all in one W&B group."""
    options = dataclasses.replace(
        options,
        tracking=dataclasses.replace(options.tracking, experiment_name=group),
        study=dataclasses.replace(options.study, seeds=None, grid=None, per_run_output_dir=False),
    )
    trials = []
    for number, changes in enumerate(all_changes, start=1):
        trial = trial_options(options, changes)
        args = trial.training
        if is_finished(args.output_dir) and not args.overwrite_output_dir:
            logger.info("Run %d/%d %s: finished earlier, not run again", number, len(all_changes), args.run_name)
            results = RunResults.load(args.output_dir)
        else:
            logger.info("Run %d/%d %s", number, len(all_changes), args.run_name)
            results = run(trial) or RunResults()  # processes other than the main one get no results
        trials.append(Trial(args.run_name, Path(args.output_dir), changes, results))
    return trials


# --- seeds ---------------------------------------------------------------------------------------------------
def run_seeds(run: RunFunction, options: RunOptions) -> dict:
    """The recipe once per seed; summary.json and summary.md/.csv: mean, std, min, max of every test MCC."""
    seeds = list(dict.fromkeys(options.study.seeds or []))
    group = options.tracking.experiment_name or f"{options.recipe}-seeds"
    trials = run_trials(run, options, [{"seed": seed} for seed in seeds], group)
    if options.training.process_index != 0:
        return {}
    summary = aggregate_seeds(trials, group)
    output_dir = Path(options.training.output_dir)
    write_json(output_dir / "summary.json", summary)
    table = seed_table(summary)
    write_text(output_dir / "summary.md", compare.to_markdown(table))
    with atomic_path(output_dir / "summary.csv") as temporary:
        table.to_csv(temporary, index=False)
    compare.compare([trial.output_dir for trial in trials], output_dir / "comparison")
    logger.info("Test MCC over %d seeds (%s):\n%s", len(seeds), group, table.to_string(index=False))
    return summary


def aggregate_seeds(trials: list[Trial], group: str) -> dict:
    """Statistics of each test set's MCC over the seeds; std is the sample standard deviation (n - 1)."""
    runs = [
        {
            "seed": trial.changes["seed"],
            "name": trial.name,
            "output_dir": str(trial.output_dir),
            "valid_mcc": trial.results.final_valid_mcc,
            "test_mcc": trial.results.test_mccs(),
        }
        for trial in trials
    ]
    splits = list(dict.fromkeys(split for run in runs for split in run["test_mcc"]))
    stats = {}
    for split in splits:
        values = [run["test_mcc"][split] for run in runs if split in run["test_mcc"]]
        stats[split] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
    return {"group": group, "seeds": [run["seed"] for run in runs], "runs": runs, "test_mcc": stats}


def seed_table(summary: dict) -> pd.DataFrame:
    """One row per seed, then mean, std, min and max; one column per test set's MCC."""
    splits = list(summary["test_mcc"])
    rows = [
        {"seed": str(run["seed"]), **{split: run["test_mcc"].get(split) for split in splits}} for run in summary["runs"]
    ]
    for statistic in ("mean", "std", "min", "max"):
        rows.append({"seed": statistic, **{split: summary["test_mcc"][split][statistic] for split in splits}})
    return pd.DataFrame(rows)
