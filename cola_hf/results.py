"""results.json, typed: what a finished run measured, read and written by this one description.

The file is the run's record and its "finished" mark (written once, last, atomically, by `RunResults.save`).
Every reader (model card, W&B, studies, cola-compare) goes through `RunResults`, so a field is renamed or added
here and nowhere else.
On disk it is plain JSON: `epochs` (one row per epoch), `test` (one entry per test set), `config` (every
argument of the run), and `kept_epoch` when the run kept its best epoch rather than its last.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cola_hf.errors import UsageError
from cola_hf.file_io import dataclass_from_json, write_json
from cola_hf.run_files import RESULTS_FILE

# The test sets a run reports, in order: the tutorial's test set first; glue_dev (the two dev sets together) is
# the GLUE validation set that public CoLA results quote.
TEST_SPLITS = ("out_of_domain_dev", "in_domain_dev", "glue_dev")
# The tutorial's training_stats table, in its column order (training_stats.csv, the card, W&B).
EPOCH_COLUMNS = (
    "epoch",
    "training_loss",
    "valid_loss",
    "valid_accuracy",
    "valid_mcc",
    "training_time_s",
    "validation_time_s",
)


@dataclass
class EpochStats:
    """One row of the tutorial's training_stats table: an epoch's training, then its validation."""

    epoch: int
    training_loss: float | None = None
    training_time_s: float | None = None
    valid_loss: float | None = None
    valid_accuracy: float | None = None
    valid_mcc: float | None = None
    validation_time_s: float | None = None
    valid_predicted_acceptable: int | None = None
    valid_predicted_unacceptable: int | None = None
    # Every validation sentence predicted as one class: MCC is 0 for a degenerate reason.
    collapsed: bool | None = None


@dataclass
class TestSetResults:
    matthews_correlation: float
    accuracy: float | None = None
    positive_ratio: float | None = None  # share of acceptable sentences in the gold labels
    n: int | None = None
    mcc_per_batch: list[float] | None = None  # the tutorial's chart: MCC of each batch of 32


@dataclass
class RunResults:
    epochs: list[EpochStats] = field(default_factory=list)
    test: dict[str, TestSetResults] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # The epoch whose model was kept and tested (--load_best_model_at_end: the best validation MCC); None: the last.
    kept_epoch: int | None = None

    # --- what readers ask of a run ---
    @property
    def valid_mccs(self) -> list[float]:
        return [row.valid_mcc for row in self.epochs if row.valid_mcc is not None]

    @property
    def final_valid_mcc(self) -> float | None:
        """Validation MCC of the model that was saved and tested: the kept epoch's, else the last epoch's."""
        if self.kept_epoch is not None:
            return next((row.valid_mcc for row in self.epochs if row.epoch == self.kept_epoch), None)
        return self.valid_mccs[-1] if self.valid_mccs else None

    @property
    def collapsed(self) -> bool:
        """The tested model predicted one class for every validation sentence (MCC 0 for a degenerate reason)."""
        epoch = self.kept_epoch if self.kept_epoch is not None else (self.epochs[-1].epoch if self.epochs else None)
        return any(row.collapsed for row in self.epochs if row.epoch == epoch)

    @property
    def best_valid_mcc(self) -> float | None:
        return max(self.valid_mccs) if self.valid_mccs else None

    @property
    def training_time_s(self) -> float | None:
        return sum(row.training_time_s or 0 for row in self.epochs) if self.epochs else None

    def test_mccs(self) -> dict[str, float]:
        return {split: result.matthews_correlation for split, result in self.test.items()}

    # --- the file ---
    def to_dict(self) -> dict[str, Any]:
        # Absent, not null: an evaluation-only epoch has no training columns, a test set may lack its chart.
        return {
            "epochs": [_without_none(asdict(row)) for row in self.epochs],
            "test": {split: _without_none(asdict(result)) for split, result in self.test.items()},
            "config": self.config,
            **({"kept_epoch": self.kept_epoch} if self.kept_epoch is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResults:
        return dataclass_from_json(cls, {key: value for key, value in data.items() if value is not None})

    def save(self, output_dir: str | Path) -> Path:
        """Write results.json. Once, last: its presence means the run finished."""
        path = Path(output_dir) / RESULTS_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, output_dir: str | Path) -> RunResults:
        """The results of the run in `output_dir`; one line (UsageError) if there are none or they don't parse."""
        path = Path(output_dir) / RESULTS_FILE
        if not path.is_file():
            raise UsageError(f"{output_dir}: no {RESULTS_FILE} (not a run directory, or the run did not finish)")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise UsageError(f"{path}: cannot read ({err})") from err


def _without_none(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if value is not None}
