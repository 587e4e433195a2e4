"""Matthews correlation coefficient as an `evaluate` module that loads from this path, offline.

The Hub's own `matthews_correlation` script cannot be downloaded on machines without internet; this one
computes the same value with scikit-learn.
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = "Matthews correlation coefficient of binary predictions: 0 for a constant classifier, 1 if perfect."
_INPUTS = "predictions: list of int (0/1); references: list of int (0/1). Returns {'matthews_correlation': float}."


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://en.wikipedia.org/wiki/Phi_coefficient"],
        )

    def _compute(self, predictions, references):
        # With one class only (a collapsed classifier) sklearn returns 0.0, the defined value.
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
