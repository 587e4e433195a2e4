"""Many runs of one recipe: `--seeds` (and where `--per_run_output_dir` puts a run); searches are in search/.

Every run is `cola_hf.run.run(options)`, called in this process with changed options, written to its own
sub-directory named after the run (OUTPUT_DIR/tutorial-lr2e-05-bs32-ep4-seed43), and tracked as its own W&B
run in one group. A run whose results.json exists is not run again and one with checkpoints continues from
the latest (cola_hf/training/output_dir.py), so an interrupted or preempted study picks up at the run it was in
(`--overwrite_output_dir` reruns everything).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cola_hf.analysis.comparison import compare
from cola_hf.config import RunOptions
from cola_hf.file_io import write_csv, write_json, write_text
from cola_hf.markdown_tables import markdown_table
from cola_hf.results import RunResults
from cola_hf.run import run
from cola_hf.training.output_dir import is_finished

logger = logging.getLogger(__name__)


@dataclass
class StudyRun:
    """One finished run of a study: its name, directory, what it changed, and its results."""

    name: str
    output_dir: Path
    changes: dict[str, Any]
    results: RunResults


# --- one run of a study ---------------------------------------------------------------------------------------
def run_options(options: RunOptions, changes: dict[str, Any] | None = None) -> RunOptions:
    """The options of one run: `changes` applied, output_dir = OUTPUT_DIR/<run name>.

    An explicit --run_name stays the name of a single run; runs of a study are named by what they vary.
    """
    changes = changes or {}
    single = not changes
    changed = options.replace(**changes, **({} if single else {"run_name": None}))
    name = changed.run_name()
    args = changed.training
    args.output_dir = str(Path(options.training.output_dir) / name)
    args.run_name = name
    return changed


def run_each(options: RunOptions, all_changes: list[dict[str, Any]], group: str) -> list[StudyRun]:
    """Run each set of changes in turn (skipping finished ones), all in one W&B group, sharing tokenized files."""
    options = dataclasses.replace(
        options,
        tracking=dataclasses.replace(options.tracking, experiment_name=group),
        study=dataclasses.replace(options.study, seeds=None, grid=None, per_run_output_dir=False),
    )
    runs, files_cache = [], {}
    for number, changes in enumerate(all_changes, start=1):
        changed = run_options(options, changes)
        args = changed.training
        if is_finished(args.output_dir) and not args.overwrite_output_dir:
            logger.info("Run %d/%d %s: finished earlier, not run again", number, len(all_changes), args.run_name)
            results = RunResults.load(args.output_dir)
        else:
            logger.info("Run %d/%d %s", number, len(all_changes), args.run_name)
            results = run(changed, files_cache) or RunResults()  # processes other than the main one get none
        runs.append(StudyRun(args.run_name, Path(args.output_dir), changes, results))
    return runs


# --- seeds ---------------------------------------------------------------------------------------------------
def run_seeds(options: RunOptions) -> dict:
    """The recipe once per seed; summary.json and summary.md/.csv: mean, std, median, IQR, min, max of every test
    MCC, and the runs that collapsed."""
    seeds = list(dict.fromkeys(options.study.seeds or []))
    group = options.tracking.experiment_name or f"{options.recipe}-seeds"
    runs = run_each(options, [{"seed": seed} for seed in seeds], group)
    if options.training.process_index != 0:
        return {}
    summary = aggregate_seeds(runs, group)
    output_dir = Path(options.training.output_dir)
    write_json(output_dir / "summary.json", summary)
    table = seed_table(summary)
    write_text(output_dir / "summary.md", markdown_table(table))
    write_csv(output_dir / "summary.csv", table)
    compare([each.output_dir for each in runs], output_dir / "comparison")
    logger.info("Test MCC over %d seeds (%s):\n%s", len(seeds), group, table.to_string(index=False))
    if summary["collapsed"]["count"]:
        logger.warning(
            "%d of %d runs collapsed (one class on validation, MCC 0): %s",
            summary["collapsed"]["count"],
            len(seeds),
            ", ".join(summary["collapsed"]["runs"]),
        )
    return summary


def aggregate_seeds(runs: list[StudyRun], group: str) -> dict:
    """Statistics of each test set's MCC over the seeds, and the runs that collapsed.

    std is the sample standard deviation (n - 1). Beside mean and std, which one collapsed seed drags far, the
    median and the interquartile range (q3 - q1, numpy's linear interpolation: `np.percentile`'s default), as
    ELECTRA and ModernBERT report. A run collapsed when its tested model predicted one class for every validation
    sentence (MCC 0 for a degenerate reason): they are counted and named.
    """
    rows = [
        {
            "seed": each.changes["seed"],
            "name": each.name,
            "output_dir": str(each.output_dir),
            "valid_mcc": each.results.final_valid_mcc,
            "kept_epoch": each.results.kept_epoch,
            "collapsed": each.results.collapsed,
            "test_mcc": each.results.test_mccs(),
        }
        for each in runs
    ]
    splits = list(dict.fromkeys(split for row in rows for split in row["test_mcc"]))
    stats = {}
    for split in splits:
        values = [row["test_mcc"][split] for row in rows if split in row["test_mcc"]]
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        stats[split] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": float(median),
            "q1": float(q1),
            "q3": float(q3),
            "iqr": float(q3 - q1),
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
    collapsed = [row["name"] for row in rows if row["collapsed"]]
    return {
        "group": group,
        "seeds": [row["seed"] for row in rows],
        "runs": rows,
        "test_mcc": stats,
        "collapsed": {"count": len(collapsed), "runs": collapsed},
    }


SUMMARY_STATISTICS = ("mean", "std", "median", "iqr", "min", "max")


def seed_table(summary: dict) -> pd.DataFrame:
    """One row per seed (whether it collapsed), then mean, std, median, IQR, min and max (the collapsed count);
    one column per test set's MCC."""
    splits = list(summary["test_mcc"])
    rows = [
        {
            "seed": str(run["seed"]),
            **{split: run["test_mcc"].get(split) for split in splits},
            "collapsed": "yes" if run.get("collapsed") else "no",
        }
        for run in summary["runs"]
    ]
    for statistic in SUMMARY_STATISTICS:
        rows.append({"seed": statistic, **{split: summary["test_mcc"][split][statistic] for split in splits}})
    rows.append({"seed": "collapsed", "collapsed": str(summary["collapsed"]["count"])})
    return pd.DataFrame(rows)
