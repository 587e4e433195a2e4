"""The predictions_<split>.tsv files, both ways: one row per sentence of a test set (or the validation split).

    sentence_source  label  sentence  prediction  prob_acceptable

`label` is the gold label, `prediction` the label at P(acceptable) > 0.5, `prob_acceptable` rounded to 6 digits.
No quoting, like the CoLA files themselves: sentences hold quote characters, never tabs. The run writes them;
the analysis, cola-compare and W&B read them back through `read_predictions`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset

from cola_hf.errors import UsageError
from cola_hf.file_io import atomic_path, read_tsv
from cola_hf.run_files import PREDICTIONS

PREDICTION_COLUMNS = ("sentence_source", "label", "sentence", "prediction", "prob_acceptable")


def predictions_file(output_dir: str | Path, split: str) -> Path:
    return Path(output_dir) / PREDICTIONS.format(split)


@dataclass
class Predictions:
    """One predictions_<split>.tsv: gold labels, 0.5-threshold predictions, P(acceptable), in file order."""

    path: Path
    sources: list[str]
    sentences: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "sentence_source": self.sources,
                "sentence": self.sentences,
                "label": self.labels,
                "prediction": self.predictions,
                "prob_acceptable": self.probabilities,
            }
        )


def write_predictions(path: str | Path, dataset: Dataset, predictions: np.ndarray, probabilities: np.ndarray) -> None:
    """The sentences of `dataset` (its source, label and sentence columns), their predictions and P(acceptable)."""
    frame = pd.DataFrame(
        {
            "sentence_source": dataset["sentence_source"],
            "label": dataset["label"],
            "sentence": dataset["sentence"],
            "prediction": predictions,
            "prob_acceptable": np.round(probabilities, 6),
        }
    )
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, sep="\t", index=False, quoting=csv.QUOTE_NONE, lineterminator="\n")


def read_predictions(path: str | Path) -> Predictions:
    """Read a predictions TSV; a bad header or row raises naming the file and the line."""
    path = Path(path)
    header, rows = read_tsv(path)
    if header != list(PREDICTION_COLUMNS):
        raise UsageError(f"{path}:1: wrong header; expected {chr(9).join(PREDICTION_COLUMNS)!r}")
    sources, sentences, labels, predictions, probabilities = [], [], [], [], []
    for number, fields in rows:
        try:
            if len(fields) != len(PREDICTION_COLUMNS) or fields[1] not in "01" or fields[3] not in "01":
                raise ValueError
            probability = float(fields[4])
            if not 0.0 <= probability <= 1.0:
                raise ValueError
        except ValueError:
            raise UsageError(
                f"{path}:{number}: expected source, label 0/1, sentence, prediction 0/1, probability in [0, 1]"
            ) from None
        sources.append(fields[0])
        labels.append(fields[1] == "1")
        sentences.append(fields[2])
        predictions.append(fields[3] == "1")
        probabilities.append(probability)
    if not sentences:
        raise UsageError(f"{path}: no rows")
    return Predictions(
        path, sources, sentences, np.array(labels, np.int8), np.array(predictions, np.int8), np.array(probabilities)
    )
