"""experiments/cola.py as a user runs it: every promised output, consistent with itself."""

import csv
import json
import re

import pandas as pd
import pytest
from conftest import run_cola
from huggingface_hub import ModelCard
from matplotlib.image import imread
from sklearn.metrics import accuracy_score, matthews_corrcoef

from cola_hf.results import TEST_SPLITS

EPOCH_KEYS = {
    "epoch",
    "training_loss",
    "valid_loss",
    "valid_accuracy",
    "valid_mcc",
    "training_time_s",
    "validation_time_s",
}
FAST = ["--report_to", "none", "--learning_rate", "1e-3", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, cola_zip, tiny_model_dir):
    output_dir = tmp_path_factory.mktemp("real") / "run"
    result = run_cola(
        "experiments/recipes/tutorial.yaml",
        "--model_name_or_path", tiny_model_dir, "--cola_source", cola_zip, "--output_dir", output_dir,
        "--num_train_epochs", "1", *FAST, in_process=True,
    )  # fmt: skip
    return output_dir, result


def read_predictions(path):
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)


def test_real_cola_run_writes_every_output(real_run):
    output_dir, result = real_run
    results = json.loads((output_dir / "results.json").read_text())
    assert [EPOCH_KEYS <= set(row) for row in results["epochs"]] == [True]
    assert {split: results["test"][split]["n"] for split in TEST_SPLITS} == {
        "out_of_domain_dev": 516,
        "in_domain_dev": 527,
        "glue_dev": 1043,
    }
    assert results["test"]["out_of_domain_dev"]["positive_ratio"] == pytest.approx(354 / 516)
    assert results["config"]["learning_rate"] == 1e-3 and results["config"]["num_train_epochs"] == 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 241  # ceil(7695 / 32) batches, one epoch
    stats = pd.read_csv(output_dir / "training_stats.csv")
    assert EPOCH_KEYS <= set(stats.columns) and len(stats) == 1
    for name in ["learning_curve.png", *(f"mcc_per_batch_{split}.png" for split in TEST_SPLITS)]:
        assert imread(output_dir / name).shape[2] in (3, 4), name
    assert "Longest tokenized sentence" in result.stderr
    assert re.search(r"out_of_domain_dev +516 ", result.stderr)  # the printed test summary


@pytest.mark.parametrize("split", TEST_SPLITS)
def test_results_mcc_equals_sklearn_on_the_predictions_file(real_run, split):
    output_dir, _ = real_run
    summary = json.loads((output_dir / "results.json").read_text())["test"][split]
    predictions = read_predictions(output_dir / f"predictions_{split}.tsv")
    assert list(predictions.columns) == ["sentence_source", "label", "sentence", "prediction", "prob_acceptable"]
    assert len(predictions) == summary["n"]
    assert summary["matthews_correlation"] == pytest.approx(
        matthews_corrcoef(predictions["label"], predictions["prediction"]), abs=1e-12
    )
    assert summary["accuracy"] == pytest.approx(accuracy_score(predictions["label"], predictions["prediction"]))
    assert ((predictions["prob_acceptable"] > 0.5) == (predictions["prediction"] == 1)).all()


def test_saved_model_works_with_pipeline_and_evaluation_only_mode(real_run, tmp_path):
    from transformers import pipeline

    output_dir, _ = real_run
    classify = pipeline("text-classification", model=str(output_dir), device="cpu")
    assert classify("The cat sat on the mat.")[0]["label"] in {"acceptable", "unacceptable"}

    evaluated = tmp_path / "eval"
    zip_path = json.loads((output_dir / "results.json").read_text())["config"]["cola_source"]
    run_cola("--do_train", "False", "--model_name_or_path", output_dir, "--cola_source", zip_path,
             "--output_dir", evaluated, "--overwrite_output_dir", "true", *FAST, in_process=True)  # fmt: skip
    trained = json.loads((output_dir / "results.json").read_text())
    again = json.loads((evaluated / "results.json").read_text())
    assert again["epochs"] == []
    for split in TEST_SPLITS:
        assert again["test"][split]["matthews_correlation"] == pytest.approx(
            trained["test"][split]["matthews_correlation"], abs=1e-9
        )
        # Same weights, same sentences: the same probabilities, sentence by sentence.
        before = read_predictions(output_dir / f"predictions_{split}.tsv")
        after = read_predictions(evaluated / f"predictions_{split}.tsv")
        assert list(after["sentence"]) == list(before["sentence"])
        assert after["prob_acceptable"].to_numpy() == pytest.approx(before["prob_acceptable"].to_numpy(), abs=2e-6)


@pytest.mark.lowest
def test_synthetic_run_with_tutorial_padding(tmp_path, cola_dir, tiny_model_dir):
    output_dir = tmp_path / "run"
    result = run_cola(
        "--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", output_dir,
        "--num_train_epochs", "2", "--pad_to_max_length", "true", "--train_sampling_strategy", "random",
        "--base_model", "bert-base-uncased", *FAST, env={"PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    # A run that reports to no W&B never imports wandb (most of a second at every run's end).
    log = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in log}
    assert "cola_hf.run" in imported and "wandb" not in imported
    results = json.loads((output_dir / "results.json").read_text())
    assert [row["epoch"] for row in results["epochs"]] == [1, 2]
    assert all(row["training_loss"] > 0 and row["validation_time_s"] > 0 for row in results["epochs"])
    assert results["test"]["glue_dev"]["n"] == 76
    assert results["config"]["pad_to_max_length"] is True
    # The output directory is a Hub repository: its card names the base model and holds the same test results.
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model == "bert-base-uncased"
    reported = {
        (entry["dataset"]["split"], metric["type"]): metric["value"]
        for entry in card.data.to_dict()["model-index"][0]["results"]
        for metric in entry["metrics"]
    }
    assert reported[("out_of_domain_dev", "matthews_correlation")] == pytest.approx(
        results["test"]["out_of_domain_dev"]["matthews_correlation"]
    )
    assert reported[("validation", "accuracy")] == pytest.approx(results["test"]["glue_dev"]["accuracy"])


def test_validation_predictions_are_the_final_models_and_feed_the_analysis(real_run):
    """predictions_validation.tsv (reused from the last validation, not predicted twice) is the saved model's:
    its MCC is the last epoch's validation MCC; the analysis reads it and every test set."""
    output_dir, _ = real_run
    results = json.loads((output_dir / "results.json").read_text())
    validation = read_predictions(output_dir / "predictions_validation.tsv")
    assert len(validation) == 856
    assert (validation["prediction"] == (validation["prob_acceptable"] > 0.5)).all()
    assert matthews_corrcoef(validation["label"], validation["prediction"]) == pytest.approx(
        results["epochs"][-1]["valid_mcc"], abs=1e-12
    )
    analysis = json.loads((output_dir / "analysis.json").read_text())
    assert set(analysis["test_sets"]) == set(TEST_SPLITS) and analysis["threshold"] is not None


def test_train_from_python_returns_the_results_it_writes(tmp_path, cola_dir, tiny_model_dir, monkeypatch):
    """The notebook call: the command line's options as keyword arguments, the typed results back."""
    from cola_hf import train
    from cola_hf.results import RunResults

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    output_dir = tmp_path / "run"
    results = train(
        cola_source=str(cola_dir), model_name_or_path=str(tiny_model_dir), output_dir=str(output_dir),
        num_train_epochs=1, max_seq_length=16, report_to="none", disable_tqdm=True, annotations_source="none",
        blimp_source="none",
    )  # fmt: skip
    assert isinstance(results, RunResults)
    assert json.loads(json.dumps(results.to_dict())) == json.loads((output_dir / "results.json").read_text())
    assert results.test["out_of_domain_dev"].n == 36 and len(results.epochs) == 1
