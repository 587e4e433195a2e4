"""What a search writes for people, from the study itself (so any worker can write it, at any time):

OUTPUT_DIR/search/trials.csv, trials.md     one row per trial: state as Optuna names it, parameters,
                                            best value of the objective and its epoch, training time
OUTPUT_DIR/search/best_params.yaml          the best trial as a recipe: `experiments/cola.py FILE --seeds ...`
OUTPUT_DIR/search/*.png                     Optuna's optimization history, parameter importances, curves
OUTPUT_DIR/search/overhead.md               where the time went: epochs vs the search's own work
OUTPUT_DIR/search/comparison/               cola-compare over the trials that reported epochs
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from cola_hf.analysis.comparison import compare
from cola_hf.charts import save_figure
from cola_hf.config import RunOptions
from cola_hf.file_io import write_csv, write_json, write_text
from cola_hf.markdown_tables import markdown_table
from cola_hf.redaction import redact_text
from cola_hf.results import RESULTS_FILE
from cola_hf.studies.search.study import BEST_BUILDER, BEST_DIR, Search

logger = logging.getLogger(__name__)


def write_reports(search: Search, best: FrozenTrial | None, best_options: RunOptions | None) -> dict:
    """Every report of the search as the study stands now; returns the summary also written as summary.json.

    `best` is the best finished trial, `best_options` its options as a recipe runs them (None: no trial yet).
    """
    search_dir = search.search_dir
    search.study.set_user_attr(f"worker_time_s:{os.uname().nodename}:{os.getpid()}", worker_times(search))
    table = trials_table(search)
    write_csv(search_dir / "trials.csv", table)
    overhead = overhead_table(search)
    saved = pruning_savings(search)
    write_text(search_dir / "trials.md", trials_markdown(search, table, best, overhead, saved))
    write_text(search_dir / "overhead.md", markdown_table(overhead))
    if best is not None and best_options is not None:
        write_best_params(search, best, best_options, search_dir / "best_params.yaml")
    write_plots(search.study, search_dir)
    finished_dirs = [
        search.trial_dir(trial.number)
        for trial in search.study.get_trials(deepcopy=False)
        if (search.trial_dir(trial.number) / RESULTS_FILE).is_file()
    ]
    if finished_dirs:
        compare(finished_dirs, search_dir / "comparison")
    states = table["state"].value_counts().to_dict() if len(table) else {}
    summary = {
        "study": search.study.study_name,
        "sweep": str(search.space.path),
        "method": search.space.method,
        "n_trials": search.n_trials,
        "states": states,
        "best": None
        if best is None
        else {
            "trial": best.number,
            search.space.objective.value_name: best.value,
            "params": search.space.option_values(best.params),
        },
        "pruning_saved_epochs": saved["epochs"],
        "pruning_saved_s": saved["seconds"],
    }
    write_json(search_dir / "summary.json", summary)
    return summary


# --- the trials table --------------------------------------------------------------------------------------------
def trials_table(search: Search) -> pd.DataFrame:
    """One row per trial, in order: number, state (Optuna's name), each parameter, what it reached."""
    trials = search.study.get_trials(deepcopy=False)
    value_name = search.space.objective.value_name
    rerun_as = {history[-1]: trial.number for trial in trials if (history := trial.system_attrs.get("retry_history"))}
    rows = []
    for trial in trials:
        params = search.space.option_values(trial.params)
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                **{name: params.get(name) for name in search.space.parameters},
                value_name: reached(trial),
                "best_epoch": trial.user_attrs.get("best_epoch"),
                "epochs_run": trial.user_attrs.get("epochs_run"),
                "training_time_s": trial.user_attrs.get("training_time_s"),
                "note": note(trial, rerun_as),
            }
        )
    columns = ["number", "state", *search.space.parameters, value_name, "best_epoch", "epochs_run"]
    return pd.DataFrame(rows, columns=[*columns, "training_time_s", "note"])


def reached(trial: FrozenTrial) -> float | None:
    """A finished trial's objective; a pruned one's best before it stopped (what it reported last)."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def note(trial: FrozenTrial, rerun_as: dict[int, int]) -> str:
    if trial.number in rerun_as:
        return f"interrupted; run again as trial {rerun_as[trial.number]}"
    if "retry_history" in trial.system_attrs:
        return f"rerun of trial {trial.system_attrs['retry_history'][-1]}"
    if trial.user_attrs.get("pruned_at") is not None:
        return f"pruned after epoch {trial.user_attrs['pruned_at']}"
    return redact_text(trial.user_attrs.get("error", ""))


def trials_markdown(
    search: Search, table: pd.DataFrame, best: FrozenTrial | None, overhead: pd.DataFrame, saved: dict
) -> str:
    objective = search.space.objective
    lines = [
        f"# Search {search.study.study_name}",
        "",
        f"{search.space.method} search over `{search.space.path}`, {search.n_trials} trials; objective: the best "
        f"{objective.label} over a trial's epochs ({'highest' if objective.greater_is_better else 'lowest'}). "
        "States are Optuna's.",
        "",
        markdown_table(table),
    ]
    if best is not None:
        params = ", ".join(f"{name}={value}" for name, value in search.space.option_values(best.params).items())
        lines += [
            f"Best: trial {best.number}, {objective.label} {best.value:.4f} at epoch "
            f"{best.user_attrs.get('best_epoch')} ({params}).",
            "",
        ]
    if saved["trials"]:
        lines += [
            f"Pruning stopped {plural(saved['trials'], 'trial')} early and saved {plural(saved['epochs'], 'epoch')} "
            f"(about {saved['seconds']:.0f} s of training and validation).",
            "",
        ]
    lines += ["## Where the time went", "", markdown_table(overhead)]
    return "\n".join(lines)


# --- best_params.yaml ------------------------------------------------------------------------------------------
def write_best_params(search: Search, best: FrozenTrial, options: RunOptions, path: Path) -> None:
    """The best trial as a recipe that runs as is, its own outputs beside the search's."""
    objective = search.space.objective
    recipe = options.recipe_values()
    recipe["output_dir"] = str(search.output_dir / "confirmation")
    header = [
        f"# The best trial of the search {search.study.study_name} ({search.space.method} over {search.space.path}):",
        f"# trial {best.number} of {search.n_trials}, best {objective.label} {best.value:.4f} at epoch "
        f"{best.user_attrs.get('best_epoch')}. Its model is in {best_dir_of(search, best)}.",
        "# Confirm it over seeds (each seed its own run, summary.md aggregates the test MCCs):",
        f"#   python experiments/cola.py {path} --seeds 42 43 44",
        "# load_best_model_at_end: the search ranked trials by their best epoch, so this recipe keeps its best",
        f"# epoch (by {objective.label}) too.",
    ]
    write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False))


def best_dir_of(search: Search, best: FrozenTrial) -> str:
    """Where best/ is (or will be): the OUTPUT_DIR of the worker that builds it, which may be another's."""
    builder = search.study.user_attrs.get(BEST_BUILDER) or {}
    if builder.get("trial") == best.number and builder.get("output_dir") != str(search.output_dir.resolve()):
        return f"{Path(builder['output_dir']) / BEST_DIR} on {builder['host']}"
    return str(search.output_dir / BEST_DIR)


def search_card_section(search: Search, best: FrozenTrial) -> str:
    """The section of best/README.md naming the search and the parameters it chose."""
    params = search.space.option_values(best.params)
    objective = search.space.objective
    rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in params.items())
    return (
        "\n## Hyperparameter search\n\n"
        f"This model is the best of a {search.space.method} search (Optuna) of {search.n_trials} trials over "
        f"`{search.space.path.name}`: trial {best.number}, chosen by its {objective.label} "
        f"({best.value:.4f}, at epoch {best.user_attrs.get('best_epoch')}); the test sets above were scored once, "
        "after the search. Its parameters:\n\n"
        f"| Parameter | Value |\n|---|---|\n{rows}\n\n"
        "Every trial is in `search/trials.md`; `search/best_params.yaml` is this recipe, to confirm over seeds.\n"
    )


# --- plots -----------------------------------------------------------------------------------------------------
PLOTS: dict[str, Callable[[optuna.Study], Any]] = {
    "optimization_history.png": lambda study: optuna.visualization.matplotlib.plot_optimization_history(study),
    "param_importances.png": lambda study: optuna.visualization.matplotlib.plot_param_importances(study),
    "intermediate_values.png": lambda study: optuna.visualization.matplotlib.plot_intermediate_values(study),
}


def write_plots(study: optuna.Study, search_dir: Path) -> None:
    """Optuna's own matplotlib plots; one that cannot be drawn yet (importances need 2 finished trials) waits."""
    for name, plot in PLOTS.items():
        with warnings.catch_warnings():
            # Experimental-API notices, and importance's "all trials alike" while few trials have finished.
            warnings.simplefilter("ignore")
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                logger.info("search/%s not drawn yet (%s)", name, err)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        save_figure(figure, search_dir / name)


# --- time ------------------------------------------------------------------------------------------------------
def worker_times(search: Search) -> dict[str, float]:
    return {"bookkeeping_s": search.bookkeeping_s, "data_s": search.data_s, "waiting_s": search.waiting_s}


def overhead_table(search: Search) -> pd.DataFrame:
    """Seconds spent on epochs (training and validation) against everything the search adds around them."""
    trials = search.study.get_trials(deepcopy=False)

    def total(name: str) -> float:
        return sum(trial.user_attrs.get(name) or 0.0 for trial in trials)

    workers = [value for key, value in search.study.user_attrs.items() if key.startswith("worker_time_s:")]
    parts = {
        "epochs: training and validation": total("epochs_s"),
        "inside train(), between epochs: checkpoint saves, best-epoch reload": total("train_s") - total("epochs_s"),
        "trial setup: model re-initialisation, Trainer, W&B run": total("setup_s"),
        "trial end: keeping the best model, reports, W&B": total("finish_s"),
        "study bookkeeping: locks, stale-trial check, ask, tell, sampler": sum(w["bookkeeping_s"] for w in workers),
        "reading and tokenizing CoLA (once per worker)": sum(w["data_s"] for w in workers),
        "waiting for other workers' last trials (no slot left)": sum(w.get("waiting_s", 0.0) for w in workers),
    }
    overall = sum(parts.values()) or math.nan
    rows = [{"part": part, "seconds": seconds, "share": seconds / overall} for part, seconds in parts.items()]
    return pd.DataFrame(rows)


def pruning_savings(search: Search) -> dict:
    """Epochs the pruned trials would still have trained, and about how long those would have taken."""
    epochs, seconds, count = 0, 0.0, 0
    base_epochs = search.options.training.num_train_epochs
    for trial in search.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        run = trial.user_attrs.get("epochs_run")
        if not run:
            continue
        planned = math.ceil(search.space.option_values(trial.params).get("num_train_epochs", base_epochs))
        count += 1
        epochs += planned - run
        seconds += (planned - run) * (trial.user_attrs.get("epochs_s") or 0.0) / run
    return {"trials": count, "epochs": epochs, "seconds": seconds}


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
