"""Accuracy as an `evaluate` module that loads from this path, offline (the Hub's script needs internet)."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to the references.",
            citation="",
            inputs_description="predictions, references: lists of int. Returns {'accuracy': float}.",
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}
