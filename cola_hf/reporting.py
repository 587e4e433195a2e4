"""Everything a run writes for people: results.json, training_stats.csv, predictions TSVs and plots.

Every file is written atomically (temporary file, then rename), so a run killed mid-write never leaves a
half-written file that looks finished.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from datasets import Dataset  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cola_hf.metrics import mcc_per_batch, score  # noqa: E402
from cola_hf.results import RESULTS_FILE, EpochStats, RunResults, TestSetResults  # noqa: E402

logger = logging.getLogger(__name__)

EPOCH_COLUMNS = (
    "epoch",
    "training_loss",
    "valid_loss",
    "valid_accuracy",
    "valid_mcc",
    "training_time_s",
    "validation_time_s",
)
PREDICTION_COLUMNS = ("sentence_source", "label", "sentence", "prediction", "prob_acceptable")
FAILED_MARKER = "RUN_FAILED"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes files private; outputs are meant to be shared
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def epoch_table(log_history: list[dict]) -> list[EpochStats]:
    """One row per epoch from the Trainer's log history: the tutorial's training_stats, plus collapse flags."""
    rows: dict[int, EpochStats] = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        row = rows.setdefault(round(entry["epoch"]), EpochStats(epoch=round(entry["epoch"])))
        if "train_epoch_loss" in entry:
            row.training_loss = entry["train_epoch_loss"]
            row.training_time_s = entry["train_epoch_time_s"]
        if "eval_loss" in entry:
            row.valid_loss = entry["eval_loss"]
            row.valid_accuracy = entry.get("eval_accuracy")
            row.valid_mcc = entry.get("eval_matthews_correlation")
            row.validation_time_s = entry.get("eval_runtime")
            row.valid_predicted_acceptable = entry.get("eval_predicted_acceptable")
            row.valid_predicted_unacceptable = entry.get("eval_predicted_unacceptable")
            row.collapsed = 0 in (row.valid_predicted_acceptable, row.valid_predicted_unacceptable)
    return [row for _, row in sorted(rows.items()) if row.training_loss is not None or row.valid_loss is not None]


def format_epoch_table(rows: list[EpochStats]) -> str:
    frame = pd.DataFrame([asdict(row) for row in rows], columns=list(EPOCH_COLUMNS)).set_index("epoch")
    return frame.to_string(float_format=lambda value: f"{value:.3f}")


def plot_learning_curve(rows: list[EpochStats], path: str | Path) -> None:
    epochs = [row.epoch for row in rows]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(epochs, [row.training_loss for row in rows], "b-o", label="Training")
    axes.plot(epochs, [row.valid_loss for row in rows], "g-o", label="Validation")
    axes.set(title="Training & validation loss", xlabel="Epoch", ylabel="Loss", xticks=epochs)
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def plot_mcc_per_batch(values: list[float], split: str, path: str | Path) -> None:
    figure, axes = plt.subplots(figsize=(10, 4.5))
    axes.bar(range(len(values)), values, color="tab:blue")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set(title=f"MCC per batch of 32: {split}", xlabel="Batch #", ylabel="MCC (-1 to +1)", ylim=(-1, 1))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(figure, path)


def save_figure(figure: plt.Figure, path: str | Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def write_predictions(path: str | Path, dataset: Dataset, predictions: np.ndarray, probabilities: np.ndarray) -> None:
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
        # No quoting: sentences hold quote characters, never tabs, like the CoLA files themselves.
        frame.to_csv(temporary, sep="\t", index=False, quoting=csv.QUOTE_NONE, lineterminator="\n")


def report_test_split(
    output_dir: Path, split: str, dataset: Dataset, labels: np.ndarray, probabilities: np.ndarray
) -> TestSetResults:
    """Write predictions and the per-batch MCC chart of one test set; return its summary for results.json."""
    predictions = (probabilities > 0.5).astype(int)
    write_predictions(output_dir / f"predictions_{split}.tsv", dataset, predictions, probabilities)
    per_batch = mcc_per_batch(labels, predictions, batch_size=32)
    plot_mcc_per_batch(per_batch, split, output_dir / f"mcc_per_batch_{split}.png")
    return TestSetResults(
        **score(labels, predictions), positive_ratio=float(np.mean(labels)), n=len(labels), mcc_per_batch=per_batch
    )


def write_epoch_outputs(output_dir: Path, rows: list[EpochStats]) -> None:
    """training_stats.csv and learning_curve.png; the table is also printed, as the tutorial does."""
    with atomic_path(output_dir / "training_stats.csv") as temporary:
        frame = pd.DataFrame(RunResults(epochs=rows).to_dict()["epochs"])
        frame[[*EPOCH_COLUMNS, *(c for c in frame.columns if c not in EPOCH_COLUMNS)]].to_csv(temporary, index=False)
    plot_learning_curve(rows, output_dir / "learning_curve.png")
    logger.info("Per-epoch statistics:\n%s", format_epoch_table(rows))


def format_test_summary(test: dict[str, TestSetResults]) -> str:
    lines = [f"{'test set':<18} {'n':>5} {'MCC':>7} {'accuracy':>9} {'positive':>9}"]
    for split, result in test.items():
        lines.append(
            f"{split:<18} {result.n:>5} {result.matthews_correlation:>7.3f} "
            f"{result.accuracy:>9.3f} {result.positive_ratio:>9.3f}"
        )
    return "\n".join(lines)


def write_results(output_dir: str | Path, results: RunResults) -> Path:
    """results.json. Write it last: its presence means the run finished."""
    path = Path(output_dir) / RESULTS_FILE
    write_json(path, results.to_dict())
    return path


def mark_failed(output_dir: str | Path, message: str) -> None:
    """Leave a marker so an interrupted or failed directory never passes for a finished one."""
    write_text(Path(output_dir) / FAILED_MARKER, message + "\n")
