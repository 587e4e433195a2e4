"""`transformers.pipeline` and `cola-predict` on a tiny saved model: labels, probabilities, MCC, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from conftest import synthetic_rows, write_tsv
from sklearn.metrics import matthews_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from cola_hf.cli.predict import main as predict_main

LABELS = {"unacceptable", "acceptable"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a classifier that spreads its predictions over both labels.

    A random 32-wide BERT gives every sentence almost the same logits, hence one label for all and an MCC of
    0 whatever the scoring code does. Scaling the head and centring its bias on sample sentences makes the
    predictions depend on the sentence, so the MCC comparison below can tell right from wrong.
    """
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = tokenizer([row[3] for row in synthetic_rows(64, seed=11)], padding=True, return_tensors="pt")
    with torch.no_grad():
        model.classifier.weight.mul_(3000)
        logits = model(**sample).logits
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    directory = tmp_path_factory.mktemp("spread-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def predict(argv: list[str], capsys) -> tuple[int, str, str]:
    status = predict_main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_tsv_output(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0] == "sentence\tlabel\tprobability"
    return [line.split("\t") for line in lines[1:]]


def test_pipeline_returns_both_label_names_with_probabilities(model_dir):
    classifier = pipeline("text-classification", model=str(model_dir))
    sentences = [row[3] for row in synthetic_rows(40, seed=12)]
    outputs = classifier(sentences, top_k=None, batch_size=8)
    assert len(outputs) == len(sentences)
    predicted = set()
    for scores in outputs:
        assert {entry["label"] for entry in scores} == LABELS
        assert all(0.0 <= entry["score"] <= 1.0 for entry in scores)
        assert sum(entry["score"] for entry in scores) == pytest.approx(1.0, abs=1e-6)
        predicted.add(max(scores, key=lambda entry: entry["score"])["label"])
    assert predicted == LABELS


def test_predict_sentences_from_arguments_as_tsv(model_dir, capsys):
    status, out, err = predict(["--model", str(model_dir), "The cat saw it.", "", "mary read the book."], capsys)
    assert status == 0
    rows = read_tsv_output(out)
    assert [row[0] for row in rows] == ["The cat saw it.", "mary read the book."]
    for _, label, probability in rows:
        assert label in LABELS
        assert 0.5 <= float(probability) <= 1.0  # the probability of the predicted one of two labels
    assert "skipped 1 empty argument(s): 2" in err


def test_predict_jsonl_scores_sum_to_one(model_dir, capsys):
    sentences = [row[3] for row in synthetic_rows(10, seed=13)]
    status, out, _ = predict(["--model", str(model_dir), "--format", "jsonl", *sentences], capsys)
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [record["sentence"] for record in records] == sentences
    for record in records:
        assert set(record["scores"]) == LABELS
        assert sum(record["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert record["probability"] == record["scores"][record["label"]] == max(record["scores"].values())


def test_predict_cola_tsv_reports_mcc_equal_to_sklearn(model_dir, tmp_path, capsys):
    rows = synthetic_rows(60, seed=14)
    source = write_tsv(tmp_path / "labelled.tsv", rows)
    output = tmp_path / "out" / "predictions.tsv"
    status, out, err = predict(
        ["--model", str(model_dir), "--input", str(source), "--output", str(output), "--batch_size", "7"], capsys
    )
    assert status == 0 and out == ""
    predicted = read_tsv_output(output.read_text(encoding="utf-8"))
    assert [row[0] for row in predicted] == [row[3] for row in rows]
    ids = [1 if label == "acceptable" else 0 for _, label, _ in predicted]
    assert 0 < sum(ids) < len(ids), "the fixture model should predict both labels"
    reported = re.search(r"(\d+) labelled sentences: matthews_correlation (-?[\d.]+), accuracy ([\d.]+)", err)
    assert reported, err
    assert int(reported[1]) == len(rows)
    assert float(reported[2]) == pytest.approx(matthews_corrcoef([row[1] for row in rows], ids), abs=1e-6)


def test_predict_plain_file_skips_empty_lines_and_truncates_long_ones(model_dir, tmp_path, capsys):
    long_sentence = "the students praised the analysis and " * 60  # several hundred tokens; the model takes 128
    source = tmp_path / "sentences.txt"
    source.write_text(f"john read it.\n\n   \n{long_sentence}\nshe wrote about them.\n", encoding="utf-8")
    status, out, err = predict(["--model", str(model_dir), "--input", str(source), "--format", "jsonl"], capsys)
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [record["sentence"] for record in records] == ["john read it.", long_sentence, "she wrote about them."]
    assert "skipped 2 empty line(s): 2, 3" in err
    assert "truncated 1 sentence(s) longer than 128 tokens" in err


BAD_INPUTS = {
    "missing-file": (["--input", "{tmp}/missing.txt"], "missing.txt: cannot read (No such file or directory)"),
    "missing-model-dir": (["--model", "{tmp}/no-such-model", "a sentence"], "no-such-model: no such directory"),
    "not-a-model": (["--model", "{tmp}", "a sentence"], "cannot load a text-classification model"),
    "bad-tsv-label": (["--input", "{tmp}/bad.tsv"], "bad.tsv:2: label must be 0 or 1, found '2'"),
    "only-empty": ([" ", ""], "nothing to classify: every sentence is empty"),
    "no-input": ([], "nothing to classify"),
}


@pytest.mark.parametrize(("extra_args", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, extra_args, message):
    write_tsv(tmp_path / "bad.tsv", [("src", 1, "", "Fine."), ("src", 2, "", "Label two.")])
    argv = ["--model", str(model_dir)] + [arg.format(tmp=tmp_path) for arg in extra_args]
    status, out, err = predict(argv, capsys)  # a later --model wins over the first
    assert status == 2
    assert out == ""
    assert err.startswith("cola-predict: error: ") and err.count("\n") == 1, err
    assert message in err


def test_console_script_exit_status(tmp_path):
    """The installed `cola-predict` entry point in a process of its own: one line on stderr, status 2."""
    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "cola-predict"]
    module, function = script.value.split(":")
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; from {module} import {function} as main; sys.exit(main())"]
        + ["--model", "some/model", "--input", str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"cola-predict: error: {tmp_path / 'missing.txt'}: cannot read (No such file or directory)"
    ]


def write_glue_test(path: Path, rows: int = 1063, header: str = "index\tsentence") -> Path:
    """A file in the layout of GLUE's CoLA test.tsv (synthetic sentences)."""
    sentences = [row[3] for row in synthetic_rows(rows, seed=15)]
    path.write_text("\n".join([header, *(f"{i}\t{s}" for i, s in enumerate(sentences))]) + "\n", encoding="utf-8")
    return path


def test_glue_submission_writes_index_and_0_1_predictions(model_dir, tmp_path, capsys):
    test_file = write_glue_test(tmp_path / "test.tsv")
    submission, labelled = tmp_path / "CoLA.tsv", tmp_path / "predictions.tsv"
    argv = ["--model", str(model_dir), "--input", str(test_file), "--batch_size", "64"]
    status, out, err = predict([*argv, "--glue_submission", str(submission), "--output", str(labelled)], capsys)
    assert status == 0 and out == ""
    assert f"wrote 1063 predictions to {submission}" in err and "GLUE's test set has" not in err
    lines = submission.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 1063
    rows = [line.split("\t") for line in lines[1:]]
    assert [index for index, _ in rows] == [str(i) for i in range(1063)]
    # 1 is acceptable: the same sentences' labels in the usual output say which is which.
    expected = ["1" if label == "acceptable" else "0" for _, label, _ in read_tsv_output(labelled.read_text())]
    assert [prediction for _, prediction in rows] == expected
    assert set(expected) == {"0", "1"}


GLUE_BAD_INPUTS = {
    "no-header": ("idx\tsentence", 3, "test.tsv:1: expected GLUE's CoLA test header 'index<TAB>sentence'"),
    "cola-train-format": ("src0\t1\t\tthe cat saw it.", 3, "test.tsv:1: expected GLUE's CoLA test header"),
    "header-only": ("index\tsentence", 0, "test.tsv: no sentences after the header"),
}


@pytest.mark.parametrize(("header", "rows", "message"), GLUE_BAD_INPUTS.values(), ids=GLUE_BAD_INPUTS.keys())
def test_glue_submission_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, header, rows, message):
    test_file = write_glue_test(tmp_path / "test.tsv", rows, header)
    argv = ["--model", str(model_dir), "--input", str(test_file), "--glue_submission", str(tmp_path / "CoLA.tsv")]
    status, out, err = predict(argv, capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "CoLA.tsv").exists()


def test_glue_submission_extra_column_and_no_input(model_dir, tmp_path, capsys):
    test_file = write_glue_test(tmp_path / "test.tsv", 5)
    lines = test_file.read_text().splitlines()
    test_file.write_text("\n".join([*lines[:3], lines[3] + "\tlabel", *lines[4:]]) + "\n")
    status, _, err = predict(["--model", str(model_dir), "--input", str(test_file), "--glue_submission", "o"], capsys)
    assert status == 2
    assert err == f"cola-predict: error: {test_file}:4: expected 2 tab-separated columns, an index and a sentence\n"
    status, _, err = predict(["--model", str(model_dir), "A sentence.", "--glue_submission", "o"], capsys)
    assert (status, err) == (
        2,
        "cola-predict: error: --glue_submission needs --input GLUE's CoLA test.tsv (index, sentence)\n",
    )
