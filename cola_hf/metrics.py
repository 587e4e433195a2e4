"""Matthews correlation and accuracy through `evaluate`, from the metric scripts shipped in this package.

Depends on nothing else in cola_hf.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import evaluate
    from transformers import EvalPrediction

METRIC_SCRIPTS = Path(__file__).parent / "metric_scripts"


@cache
def cola_metrics() -> evaluate.CombinedEvaluations:
    """`evaluate.combine` of the shipped MCC and accuracy modules: compute() -> matthews_correlation, accuracy."""
    import evaluate  # a third of a second, with scipy's statistics: imported at the first score, not with the module

    return evaluate.combine(
        [evaluate.load(str(METRIC_SCRIPTS / "matthews_correlation")), evaluate.load(str(METRIC_SCRIPTS / "accuracy"))]
    )


def score(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():
        # sklearn warns when only one class is present; MCC is then 0 by definition, which is what we report.
        warnings.simplefilter("ignore", UserWarning)
        return cola_metrics().compute(predictions=predictions, references=labels)


def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """For `Trainer(compute_metrics=...)`: MCC, accuracy, and the predicted class counts (to spot a collapse)."""
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    acceptable = int(predictions.sum())
    return {
        **score(eval_prediction.label_ids, predictions),
        "predicted_acceptable": acceptable,
        "predicted_unacceptable": len(predictions) - acceptable,
    }


def mcc_per_batch(labels: np.ndarray, predictions: np.ndarray, batch_size: int = 32) -> list[float]:
    """MCC of each consecutive batch, as the tutorial plots it for its test set."""
    return [
        score(labels[start : start + batch_size], predictions[start : start + batch_size])["matthews_correlation"]
        for start in range(0, len(labels), batch_size)
    ]
