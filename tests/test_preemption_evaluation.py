"""SIGTERM after training, while the test sets are predicted or BLiMP is scored: the run stops at its next batch
(exit 75, no results.json), and the same command neither trains again nor keeps anything of the cut evaluation:
it evaluates anew and ends with the predictions of a run never cut.

The command line runs in this process (`cola_hf.cli.train.main`), offline, on the tiny random BERT. The signal is
the real SIGTERM, sent to this process from inside the library at the moment under test: from transformers'
`Trainer.predict` (the test sets), or from the model's forward pass under `torch.inference_mode` (only BLiMP's
scorer runs the model so; the Trainer predicts under `no_grad`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import transformers
from conftest import write_cola_dir
from transformers.models.bert import modeling_bert

from cola_hf.cli.train import main

STOPPED = 75
OUTPUTS = ("predictions_out_of_domain_dev.tsv", "predictions_in_domain_dev.tsv", "predictions_glue_dev.tsv",
           "predictions_validation.tsv", "predictions_blimp.tsv")  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cola_dir(tmp_path_factory.mktemp("evaluation-cut") / "raw", train=64)


def command(tiny_model_dir: Path, data: Path, blimp_dir: Path, output_dir: Path) -> list[str]:
    return ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data), "--output_dir", str(output_dir),
            "--blimp_source", str(blimp_dir), "--annotations_source", "none", "--num_train_epochs", "2",
            "--global_train_batch_size", "16", "--learning_rate", "1e-2", "--max_seq_length", "16",
            "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def uncut(tmp_path_factory, tiny_model_dir, data, blimp_dir) -> Path:
    output_dir = tmp_path_factory.mktemp("uncut") / "run"
    assert main(command(tiny_model_dir, data, blimp_dir, output_dir)) == 0
    return output_dir


def sigterm_once(monkeypatch, owner: type, name: str, when=lambda: True) -> list[int]:
    """Send SIGTERM to this process once, on the first call of owner.name for which `when()` holds."""
    original, sent = getattr(owner, name), []

    @functools.wraps(original)  # the Trainer reads the model's forward's signature
    def cut(*args, **kwargs):
        if not sent and when():
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, cut)
    return sent


CUTS = {
    "test sets": (transformers.Trainer, "predict", lambda: True, "while scoring the test sets"),
    "BLiMP": (
        modeling_bert.BertForSequenceClassification,
        "forward",
        torch.is_inference_mode_enabled,
        "while scoring BLiMP",
    ),  # fmt: skip
}


@pytest.mark.parametrize("during", CUTS)
def test_sigterm_during_evaluation_stops_and_the_same_command_evaluates_anew(
    during, monkeypatch, tmp_path, tiny_model_dir, data, blimp_dir, uncut, capsys
):
    owner, name, when, words = CUTS[during]
    output_dir = tmp_path / "run"
    argv = command(tiny_model_dir, data, blimp_dir, output_dir)
    with monkeypatch.context() as cutting:
        sent = sigterm_once(cutting, owner, name, when)
        assert main(argv) == STOPPED
    assert sent
    stopped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cola: stopped by")]
    assert stopped == [f"cola: stopped by SIGTERM {words}; run the same command to continue"]
    assert not (output_dir / "results.json").exists()

    assert main(argv) == 0
    again = capsys.readouterr()
    assert "'loss'" not in again.out and "train_epoch_loss" not in again.out  # not one training step again
    for output in OUTPUTS:
        assert (output_dir / output).read_text() == (uncut / output).read_text(), output
    got, expected = (json.loads((run / "results.json").read_text()) for run in (output_dir, uncut))
    assert got["test"] == expected["test"]
    assert [untimed(row) for row in got["epochs"]] == [untimed(row) for row in expected["epochs"]]


def untimed(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.endswith("_time_s")}
