"""Many runs of one recipe: `--seeds`, a local `--grid`, and `--per_run_output_dir`.

Every run is `cola_hf.run.run(options)`, called in this process with changed options, written to its own
sub-directory named after the run (OUTPUT_DIR/tutorial-lr2e-05-bs32-ep4-seed43), and tracked as its own W&B
run in one group. A run whose results.json exists is not run again and one with checkpoints continues from
the latest, so an interrupted study picks up where it stopped (`--overwrite_output_dir` reruns everything).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cola_hf import compare
from cola_hf.config import RunOptions, make_parser
from cola_hf.errors import UsageError
from cola_hf.output_dir import is_finished, latest_complete_checkpoint
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
    if study.seeds:
        return run_seeds(run, options)
    if study.grid:
        return run_grid(run, options)
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
    if not is_finished(args.output_dir) and not args.overwrite_output_dir:
        # An interrupted run continues from its latest checkpoint instead of refusing to start.
        args.resume = latest_complete_checkpoint(args.output_dir) is not None
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


# --- the grid ------------------------------------------------------------------------------------------------
def load_grid(path: str | Path) -> dict[str, list[Any]]:
    """The `parameters` of a W&B grid sweep file, each value converted by the flag's own type."""
    path = Path(path)
    try:
        sweep = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"--grid {path}: cannot read ({err})") from err
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise UsageError(f"--grid {path}: expected a W&B sweep file with a 'parameters' mapping")
    if sweep.get("method", "grid") != "grid":
        raise UsageError(f"--grid {path}: method is {sweep['method']!r}; only a grid can be run locally")
    actions = {action.dest: action for action in make_parser()._actions}
    grid: dict[str, list[Any]] = {}
    for name, spec in sweep["parameters"].items():
        if name not in actions:
            raise UsageError(f"--grid {path}: '{name}' is not an option of experiments/cola.py")
        values = spec.get("values", [spec["value"]] if "value" in spec else None) if isinstance(spec, dict) else None
        if not values:
            raise UsageError(f"--grid {path}: parameter '{name}' needs 'values: [...]' (or 'value')")
        # str() first, like the W&B agent's --name=value flags, so both paths parse a value the same way.
        convert = actions[name].type or str
        try:
            grid[name] = [convert(str(value)) for value in values]
        except (TypeError, ValueError) as err:
            raise UsageError(f"--grid {path}: bad value for '{name}' ({err})") from err
    return grid


def grid_combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def run_grid(run: RunFunction, options: RunOptions) -> dict:
    """Every combination of the grid in turn; grid_summary.json names the best by validation MCC."""
    grid = load_grid(options.study.grid)
    group = options.tracking.experiment_name or f"{options.recipe}-{Path(options.study.grid).stem}"
    trials = run_trials(run, options, grid_combinations(grid), group)
    if options.training.process_index != 0:
        return {}
    runs = [
        {
            "name": trial.name,
            "output_dir": str(trial.output_dir),
            **trial.changes,
            "valid_mcc": trial.results.final_valid_mcc,
            "test_mcc": trial.results.test_mccs(),
        }
        for trial in trials
    ]
    scored = [run for run in runs if run["valid_mcc"] is not None]
    best = max(scored, key=lambda run: run["valid_mcc"]) if scored else None
    summary = {"group": group, "grid": grid, "runs": runs, "best": best}
    output_dir = Path(options.training.output_dir)
    write_json(output_dir / "grid_summary.json", summary)
    compare.compare([trial.output_dir for trial in trials], output_dir / "comparison")
    if best is not None:
        tests = ", ".join(f"{split} {mcc:.3f}" for split, mcc in best["test_mcc"].items())
        logger.info(
            "Best of %d by validation MCC: %s (validation MCC %.3f); test MCC: %s",
            len(runs),
            best["name"],
            best["valid_mcc"],
            tests,
        )
    return summary
