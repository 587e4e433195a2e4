"""What a search optimises: one metric, its direction and the best-epoch rule, as one object.

A trial's value is its best epoch's value of the metric on the validation set. Every part of the search reads it
from here: the options a trial and best_params.yaml run with (the Trainer keeps the best epoch by the same
metric), what `ReportEpochs` reports to Optuna, which epoch `record_trial` records, the study's direction, which
trial is best, and the names and words of the reports. The sweep file's `metric:` chooses it (`from_sweep`); with
none, it is validation MCC, maximised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cola_hf.errors import UsageError
from cola_hf.results import EpochStats


@dataclass(frozen=True)
class Objective:
    """One metric of the validation set, and whether higher is better."""

    metric: str  # the Trainer's name, without "eval_": what `metric_for_best_model` takes
    greater_is_better: bool
    epoch_column: str  # the EpochStats field that holds it, per epoch
    label: str  # in sentences of the reports and logs
    sweep_name: str  # how the Trainer's W&B callback logs it: the name a W&B sweep file's `metric:` gives

    @property
    def direction(self) -> str:
        """Optuna's study direction, which is also a W&B sweep's `goal`."""
        return "maximize" if self.greater_is_better else "minimize"

    @property
    def value_name(self) -> str:
        """A trial's value in the reports (trials.csv, summary.json, results.json's search section)."""
        return f"best_{self.epoch_column}"

    def trainer_options(self) -> dict[str, Any]:
        """The options that make a run keep its best epoch by this metric: a trial is ranked by its best epoch,
        so a run of its recipe (best_params.yaml) keeps its best epoch too."""
        return {
            "load_best_model_at_end": True,
            "metric_for_best_model": self.metric,
            "greater_is_better": self.greater_is_better,
            "eval_strategy": "epoch",
            "save_strategy": "epoch",
        }

    def of_evaluation(self, metrics: Mapping[str, float] | None) -> float | None:
        """The value in one evaluation's metrics (the Trainer's `eval_` names), None if absent."""
        return (metrics or {}).get(f"eval_{self.metric}")

    def of_epoch(self, row: EpochStats) -> float | None:
        return getattr(row, self.epoch_column)

    def better(self, value: float, than: float) -> bool:
        """Strictly better: of equals, the first stays best, as with the Trainer's best checkpoint."""
        return value > than if self.greater_is_better else value < than

    def best_so_far(self, best: float | None, value: float) -> float:
        return value if best is None or self.better(value, best) else best

    def best_epoch(self, epochs: Iterable[EpochStats]) -> EpochStats:
        """The epoch with the best value; of equals, the first (the one the Trainer's best checkpoint holds)."""
        scored = [row for row in epochs if self.of_epoch(row) is not None]
        best = scored[0]  # trainer_options() validates every epoch
        for row in scored[1:]:
            if self.better(self.of_epoch(row), self.of_epoch(best)):
                best = row
        return best


VALIDATION_MCC = Objective(
    metric="matthews_correlation",
    greater_is_better=True,
    epoch_column="valid_mcc",
    label="validation MCC",
    sweep_name="eval/matthews_correlation",
)
# Cross-entropy on the validation set: smooth where MCC is flat (a model still predicting one class), but it
# rewards calibrated probabilities rather than the decisions MCC scores.
VALIDATION_LOSS = Objective(
    metric="loss",
    greater_is_better=False,
    epoch_column="valid_loss",
    label="validation loss",
    sweep_name="eval/loss",
)
OBJECTIVES = {objective.sweep_name: objective for objective in (VALIDATION_MCC, VALIDATION_LOSS)}


def from_sweep(path: Path, metric: Any) -> Objective:
    """The objective a sweep file's `metric: {name, goal}` names (validation MCC without one); a name it does not
    know, or a goal against the metric's own direction, is refused."""
    if metric is None:
        return VALIDATION_MCC
    objective = OBJECTIVES.get(metric.get("name")) if isinstance(metric, dict) else None
    if objective is None or metric.get("goal", objective.direction) != objective.direction:
        choices = " or ".join(f"{{name: {each.sweep_name}, goal: {each.direction}}}" for each in OBJECTIVES.values())
        raise UsageError(f"{path}: metric is {json.dumps(metric)}; the search optimises metric: {choices}")
    return objective
