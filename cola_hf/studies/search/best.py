"""OUTPUT_DIR/best/: the best trial's best-epoch model, scored on the test sets and reported like any run.

Built by the run's own phases: prepare (from the trial's model) + evaluate + finish with the search's section, so
results.json is written once, with its `search` section, and the card is complete before anything is uploaded.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial
from transformers import TrainerState

from cola_hf.errors import UsageError
from cola_hf.results import RunResults
from cola_hf.run import evaluate, finish, prepare
from cola_hf.studies.search.report import search_card_section
from cola_hf.studies.search.study import BEST_DIR, MODEL_DIR, Search
from cola_hf.studies.search.trial import trial_options

logger = logging.getLogger(__name__)


def finish_best(search: Search, best: FrozenTrial, trial_dir: Path) -> RunResults | None:
    """Build best/ for the study's best trial from its directory `trial_dir` (this worker's or another's, see
    study.claim_best), unless best/ holds that trial already; its results, or None."""
    best_dir = search.output_dir / BEST_DIR
    if is_current_best(best_dir, best.number):
        return None
    model_dir = trial_dir / MODEL_DIR
    if best_dir.exists():
        shutil.rmtree(best_dir)  # an earlier best's outputs
    changes = search.space.option_values(best.params)
    options = trial_options(search, changes, best_dir, f"{search.group}-best")
    options = options.replace(log_model=search.options.tracking.log_model)  # a whole run's model, unlike a trial's
    link_or_copy_tree(model_dir, best_dir)
    prepared = prepare(options, search.files_cache, model_dir=str(best_dir))
    state = TrainerState.load_from_json(str(trial_dir / "trainer_state.json"))
    prepared.trainer.state.log_history = state.log_history  # the best trial's epochs, for the reports and the card
    results = finish(
        prepared,
        evaluate(prepared),
        search=search_section(search, best, changes),
        card_sections=[search_card_section(search, best)],
    )
    logger.info(
        "Best trial %d (%s %.4f): its model and test results are in %s",
        best.number,
        search.space.objective.label,
        best.value,
        best_dir,
    )
    return results


def search_section(search: Search, best: FrozenTrial, changes: dict[str, Any]) -> dict[str, Any]:
    """results.json's `search`: which study and trial best/ holds (is_current_best reads it)."""
    return {
        "sweep": str(search.space.path),
        "method": search.space.method,
        "study": search.study.study_name,
        "trial": best.number,
        search.space.objective.value_name: best.value,
        "best_epoch": best.user_attrs.get("best_epoch"),
        "params": changes,
        "n_trials": search.n_trials,
    }


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
