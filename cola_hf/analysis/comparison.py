"""Runs side by side from their results.json, without W&B: what `cola-compare DIR...` and every study write.

Into an output directory: comparison.md and comparison.csv (one row per run: its hyperparameters, validation
MCC, every test set's MCC) and comparison.png (validation MCC and loss per epoch, one line per run); on demand,
phenomena.md/.csv (MCC per grammatical phenomenon), significance.md (cola_hf.analysis.significance: paired
bootstrap for two runs, Welch's t-test for two groups of seeds) and blimp_comparison.md/.csv (BLiMP's pair
accuracy per phenomenon, cola_hf.analysis.blimp: exact McNemar for two runs, Welch for two groups).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cola_hf.charts import pyplot, save_figure
from cola_hf.errors import UsageError
from cola_hf.file_io import write_csv, write_text
from cola_hf.markdown_tables import markdown_table
from cola_hf.predictions_tsv import predictions_file
from cola_hf.results import RESULTS_FILE, RunResults


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name; with parents added while two runs would share a label (seed-42 of two studies)."""
    parts = [run_dir.resolve().parts for run_dir in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(run_dir) for run_dir in run_dirs]


def summary_row(label: str, results: RunResults) -> dict:
    config = results.config
    row = {
        "run": label,
        "model": Path(str(config.get("model_name_or_path", "?")).rstrip("/")).name,
        "learning_rate": config.get("learning_rate"),
        "batch_size": batch_size(config),
        "epochs": config.get("num_train_epochs"),
        "seed": config.get("seed"),
        "valid_mcc": results.final_valid_mcc,
        "best_valid_mcc": results.best_valid_mcc,
    }
    for split, mcc in results.test_mccs().items():
        row[f"{split}_mcc"] = mcc
    row["training_time_s"] = results.training_time_s
    return row


def batch_size(config: dict) -> int | None:
    """Sentences per optimizer step: the global batch where the run had one, else per device x accumulation."""
    if config.get("global_train_batch_size"):
        return config["global_train_batch_size"]
    if config.get("per_device_train_batch_size") is None:
        return None
    return config["per_device_train_batch_size"] * (config.get("gradient_accumulation_steps") or 1)


def comparison_table(run_dirs: list[Path]) -> tuple[pd.DataFrame, list[RunResults]]:
    all_results = [RunResults.load(run_dir) for run_dir in run_dirs]
    rows = [summary_row(label, results) for label, results in zip(run_labels(run_dirs), all_results, strict=True)]
    return pd.DataFrame(rows), all_results


def plot_curves(labels: list[str], all_results: list[RunResults], path: Path) -> None:
    """Validation MCC per epoch (left), training (solid) and validation (dashed) loss per epoch (right)."""
    figure, (mcc_axes, loss_axes) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for index, (label, results) in enumerate(zip(labels, all_results, strict=True)):
        color = f"C{index % 10}"
        x = [row.epoch for row in results.epochs]
        mcc_axes.plot(x, [row.valid_mcc for row in results.epochs], "-o", color=color, label=label)
        loss_axes.plot(x, [row.training_loss for row in results.epochs], "-o", color=color, label=f"{label} train")
        loss_axes.plot(x, [row.valid_loss for row in results.epochs], "--s", color=color, label=f"{label} valid")
    mcc_axes.set(title="Validation MCC", xlabel="Epoch", ylabel="MCC")
    loss_axes.set(title="Loss (solid: training, dashed: validation)", xlabel="Epoch", ylabel="Loss")
    for axes in (mcc_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    mcc_axes.legend(fontsize="small")
    save_figure(figure, path)


def compare(run_dirs: list[Path], output_dir: Path) -> pd.DataFrame:
    """Write comparison.md, comparison.csv and comparison.png into output_dir; return the table."""
    frame, all_results = comparison_table(run_dirs)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / "comparison.md", markdown_table(frame))
    write_csv(output_dir / "comparison.csv", frame)
    plot_curves(list(frame["run"]), all_results, output_dir / "comparison.png")
    return frame


def run_groups(paths: list[Path]) -> list[list[Path]]:
    """Each DIR as a list of runs: a run directory alone, or a directory of runs (a seed study) as a group."""

    def is_run(path: Path) -> bool:
        return (path / RESULTS_FILE).is_file() or predictions_file(path, "glue_dev").is_file()

    # A directory that is neither stays as it is, for RunResults.load to name.
    return [[path] if is_run(path) else sorted(p for p in path.glob("*/") if is_run(p)) or [path] for path in paths]


def write_phenomena(
    labels: list[str], groups: list[list[Path]], output_dir: Path, annotations_source: str | None, minor: bool
) -> str:
    """phenomena.md and phenomena.csv: per-phenomenon MCC of every run or group, side by side; the table."""
    from cola_hf.analysis.significance import phenomena_comparison

    display, per_run = phenomena_comparison(labels, groups, annotations_source, minor)
    write_text(output_dir / "phenomena.md", markdown_table(display))
    write_csv(output_dir / "phenomena.csv", per_run)
    return markdown_table(display)


def write_significance(labels: list[str], groups: list[list[Path]], output_dir: Path) -> str:
    """significance.md: each run or group against the first, on glue_dev; the table, and the runs that collapsed."""
    from cola_hf.analysis.significance import collapse_note, significance_markdown, significance_tests

    table = significance_markdown(significance_tests(labels, groups)) + collapse_note(labels, groups)
    write_text(output_dir / "significance.md", table)
    return table


def write_blimp(labels: list[str], groups: list[list[Path]], output_dir: Path) -> str:
    """blimp_comparison.md and .csv: each run or group against the first on BLiMP's pairs, per phenomenon."""
    from cola_hf.analysis.blimp_report import compare_blimp, comparison_markdown

    if len(groups) < 2:
        raise UsageError("--blimp needs two runs, or two directories of seed runs, to compare")
    sections, frames = [], []
    for label, members in zip(labels[1:], groups[1:], strict=True):
        frame = compare_blimp([groups[0], members])
        sections.append(f"## {labels[0]} (a) against {label} (b)\n\n{comparison_markdown(frame, labels[0], label)}")
        frames.append(frame.assign(a=labels[0], b=label))
    text = "\n".join(sections)
    write_text(output_dir / "blimp_comparison.md", text)
    write_csv(output_dir / "blimp_comparison.csv", pd.concat(frames, ignore_index=True))
    return text
