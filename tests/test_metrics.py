import numpy as np
import pytest
from sklearn.metrics import accuracy_score, matthews_corrcoef

from cola_hf.metrics import METRIC_SCRIPTS, cola_metrics, mcc_per_batch, score


@pytest.mark.parametrize("seed", range(5))
def test_metric_module_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    result = cola_metrics().compute(predictions=predictions, references=labels)
    assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-12)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)


@pytest.mark.parametrize("constant", [0, 1])
def test_all_one_class_gives_zero_like_sklearn(constant):
    labels = np.array([0, 1, 1, 0, 1])
    predictions = np.full(5, constant)
    assert score(labels, predictions)["matthews_correlation"] == matthews_corrcoef(labels, predictions) == 0.0


def test_metric_script_loads_by_path_with_evaluate():
    import evaluate

    module = evaluate.load(str(METRIC_SCRIPTS / "matthews_correlation"))
    assert module.compute(predictions=[1, 0, 1], references=[1, 0, 0]) == {
        "matthews_correlation": pytest.approx(matthews_corrcoef([1, 0, 0], [1, 0, 1]))
    }


def test_mcc_per_batch_matches_sklearn_batch_by_batch():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 70), rng.integers(0, 2, 70)
    per_batch = mcc_per_batch(labels, predictions, batch_size=32)
    assert len(per_batch) == 3
    assert per_batch[2] == pytest.approx(matthews_corrcoef(labels[64:], predictions[64:]))
