"""The tutorial's own outputs of a run: training_stats.csv, the learning curve, predictions and the MCC per batch
of each test set, and the tables it prints.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset

from cola_hf.charts import pyplot, save_figure
from cola_hf.file_io import write_csv
from cola_hf.metrics import mcc_per_batch, score
from cola_hf.predictions_tsv import predictions_file, write_predictions
from cola_hf.results import EPOCH_COLUMNS, EpochStats, RunResults, TestSetResults
from cola_hf.run_files import LEARNING_CURVE, MCC_PER_BATCH, TRAINING_STATS

logger = logging.getLogger(__name__)


def write_epoch_outputs(output_dir: Path, rows: list[EpochStats]) -> None:
    """training_stats.csv and learning_curve.png; the table is also printed, as the tutorial does."""
    frame = pd.DataFrame(RunResults(epochs=rows).to_dict()["epochs"])
    write_csv(output_dir / TRAINING_STATS, frame[[*EPOCH_COLUMNS, *(c for c in frame if c not in EPOCH_COLUMNS)]])
    plot_learning_curve(rows, output_dir / LEARNING_CURVE)
    logger.info("Per-epoch statistics:\n%s", format_epoch_table(rows))


def report_test_split(
    output_dir: Path, split: str, dataset: Dataset, labels: np.ndarray, probabilities: np.ndarray
) -> TestSetResults:
    """Write predictions and the per-batch MCC chart of one test set; return its summary for results.json."""
    predictions = (probabilities > 0.5).astype(int)
    write_predictions(predictions_file(output_dir, split), dataset, predictions, probabilities)
    per_batch = mcc_per_batch(labels, predictions, batch_size=32)
    plot_mcc_per_batch(per_batch, split, output_dir / MCC_PER_BATCH.format(split))
    return TestSetResults(
        **score(labels, predictions), positive_ratio=float(np.mean(labels)), n=len(labels), mcc_per_batch=per_batch
    )


def format_epoch_table(rows: list[EpochStats]) -> str:
    frame = pd.DataFrame([asdict(row) for row in rows], columns=list(EPOCH_COLUMNS)).set_index("epoch")
    return frame.to_string(float_format=lambda value: f"{value:.3f}")


def format_test_summary(test: dict[str, TestSetResults]) -> str:
    lines = [f"{'test set':<18} {'n':>5} {'MCC':>7} {'accuracy':>9} {'positive':>9}"]
    for split, result in test.items():
        lines.append(
            f"{split:<18} {result.n:>5} {result.matthews_correlation:>7.3f} "
            f"{result.accuracy:>9.3f} {result.positive_ratio:>9.3f}"
        )
    return "\n".join(lines)


def plot_learning_curve(rows: list[EpochStats], path: str | Path) -> None:
    epochs = [row.epoch for row in rows]
    figure, axes = pyplot().subplots(figsize=(8, 4.5))
    axes.plot(epochs, [row.training_loss for row in rows], "b-o", label="Training")
    axes.plot(epochs, [row.valid_loss for row in rows], "g-o", label="Validation")
    axes.set(title="Training & validation loss", xlabel="Epoch", ylabel="Loss", xticks=epochs)
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def plot_mcc_per_batch(values: list[float], split: str, path: str | Path) -> None:
    from matplotlib.ticker import MaxNLocator

    figure, axes = pyplot().subplots(figsize=(10, 4.5))
    axes.bar(range(len(values)), values, color="tab:blue")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set(title=f"MCC per batch of 32: {split}", xlabel="Batch #", ylabel="MCC (-1 to +1)", ylim=(-1, 1))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(figure, path)
