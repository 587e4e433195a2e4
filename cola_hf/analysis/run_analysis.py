"""What a model gets wrong, from a run directory's predictions_<split>.tsv files: analysis.json, analysis.md, charts.

Per test set: MCC with a bootstrap interval, confusion matrix, calibration (ECE, reliability diagram), the
decision threshold chosen on the validation split, and scores per sentence source. On glue_dev, scores per
grammatical phenomenon (CoLA's annotations: cola_hf.data.annotations). Several runs side by side, and the tests
between them, are in cola_hf.analysis.significance.

Bootstraps are vectorised: each resample's confusion counts come from one `np.bincount`, so the whole analysis
takes well under two seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cola_hf.charts import pyplot, save_figure
from cola_hf.data.annotations import ANNOTATIONS_URL, HOW_TO_PROVIDE, check_rows, load_annotations
from cola_hf.file_io import JsonRecord, write_text
from cola_hf.predictions_tsv import Predictions, predictions_file, read_predictions
from cola_hf.results import TEST_SPLITS
from cola_hf.run_files import (
    ANALYSIS_JSON,
    ANALYSIS_MARKDOWN,
    CONFUSION_CHART,
    PHENOMENA_CHART,
    RELIABILITY_CHART,
    THRESHOLD_CHART,
)

logger = logging.getLogger(__name__)

__all__ = ["RunAnalysis", "analyze_run", "phenomena_markdown", "wandb_tables"]

SPLITS = ("validation", *TEST_SPLITS)
SCHEMA_VERSION = 1
RESAMPLES = 1000  # per interval in a run; percentile intervals, seeded so a rerun gives the same figures
BOOTSTRAP_SEED = 0
CALIBRATION_BINS = 10
THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
ONE_CLASS_NOTE = "one class only: MCC undefined"
PREDICTED_ONE_CLASS_NOTE = "the model predicts one class here: MCC 0 by convention"


# --- the schema of analysis.json --------------------------------------------------------------------------------
@dataclass
class SubsetScore:
    """Scores of a subset of sentences (a phenomenon, a source) at the 0.5 threshold."""

    n: int
    n_acceptable: int
    matthews_correlation: float | None  # None where the subset has one class only
    accuracy: float | None  # None where the subset is empty
    mcc_ci_low: float | None = None  # 95% percentile bootstrap interval of the MCC
    mcc_ci_high: float | None = None
    note: str = ""


@dataclass
class CalibrationBin:
    """Sentences whose P(acceptable) falls in [lower, upper): their mean P(acceptable), the fraction acceptable."""

    lower: float
    upper: float
    n: int
    mean_probability: float | None
    fraction_acceptable: float | None


@dataclass
class TestSetAnalysis:
    score: SubsetScore
    # Rows: true unacceptable, acceptable; columns: predicted unacceptable, acceptable.
    confusion_matrix: list[list[int]]
    # Over P(acceptable) in CALIBRATION_BINS equal-width bins: sum of |mean P - fraction acceptable|, weighted by n.
    expected_calibration_error: float
    reliability: list[CalibrationBin]
    # At the threshold chosen on the validation split (None without predictions_validation.tsv).
    mcc_at_validation_threshold: float | None
    accuracy_at_validation_threshold: float | None
    sources: dict[str, SubsetScore]


@dataclass
class ThresholdAnalysis:
    """MCC against the decision threshold on the validation split, and the threshold that maximises it."""

    chosen_on: str
    threshold: float
    mcc_at_threshold: float
    mcc_at_half: float
    thresholds: list[float]
    mcc: list[float]


@dataclass
class AnnotationInfo:
    source: str
    file: str
    minor_file: str | None
    note: str  # the known differences with CoLA 1.1, once


@dataclass
class RunAnalysis(JsonRecord):
    """Everything in analysis.json. `phenomena` maps each major feature's name to its scores on glue_dev."""

    run_dir: str
    test_sets: dict[str, TestSetAnalysis]
    threshold: ThresholdAnalysis | None
    phenomena: dict[str, SubsetScore]
    minor_phenomena: dict[str, SubsetScore]
    annotations: AnnotationInfo | None
    bootstrap_resamples: int
    notes: list[str]
    seconds: float = 0.0
    charts: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION


# --- vectorised scores ----------------------------------------------------------------------------------------
def mcc_from_counts(counts: np.ndarray) -> np.ndarray:
    """MCC from confusion counts [..., (tn, fp, fn, tp)]; 0 where a margin is empty, as sklearn defines it."""
    tn, fp, fn, tp = (counts[..., cell].astype(float) for cell in range(4))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)


def confusion_cells(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Each sentence's confusion cell: 0 tn, 1 fp, 2 fn, 3 tp."""
    return 2 * labels.astype(np.int64) + predictions


def matthews_correlation(labels: np.ndarray, predictions: np.ndarray) -> float:
    """MCC of 0/1 arrays; 0 where a margin is empty, as sklearn defines it."""
    return float(mcc_from_counts(np.bincount(confusion_cells(labels, predictions), minlength=4)))


def resampled_counts(cells: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Confusion counts (resamples, 4) of every row of `indices` in one bincount."""
    resamples = len(indices)
    offsets = 4 * np.arange(resamples)[:, None]
    return np.bincount((cells[indices] + offsets).ravel(), minlength=4 * resamples).reshape(resamples, 4)


def _two_classes(counts: np.ndarray) -> np.ndarray:
    return (counts[..., 0] + counts[..., 1] > 0) & (counts[..., 2] + counts[..., 3] > 0)


def bootstrap_mcc_interval(
    labels: np.ndarray, predictions: np.ndarray, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float | None, float | None]:
    """95% percentile interval of the MCC over resamples of the sentences; resamples with one class are left out."""
    rng = np.random.default_rng(seed)
    counts = resampled_counts(
        confusion_cells(labels, predictions), rng.integers(0, len(labels), (resamples, len(labels)))
    )
    values = mcc_from_counts(counts)[_two_classes(counts)]
    if len(values) < resamples / 2:  # too few resamples hold both classes for an interval to mean anything
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def subset_score(labels: np.ndarray, predictions: np.ndarray, interval: bool = True) -> SubsetScore:
    counts = np.bincount(confusion_cells(labels, predictions), minlength=4)
    n, n_acceptable = len(labels), int(labels.sum())
    accuracy = float((counts[0] + counts[3]) / n) if n else None
    if n == 0 or not _two_classes(counts):
        return SubsetScore(n, n_acceptable, None, accuracy, note=ONE_CLASS_NOTE if n else "no sentences")
    low, high = bootstrap_mcc_interval(labels, predictions) if interval else (None, None)
    predicted_classes = int(counts[0] + counts[2] > 0) + int(counts[1] + counts[3] > 0)
    note = PREDICTED_ONE_CLASS_NOTE if predicted_classes < 2 else ""
    return SubsetScore(n, n_acceptable, float(mcc_from_counts(counts)), accuracy, low, high, note)


def mcc_by_threshold(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """MCC of `probabilities > t` for every threshold t, in one pass."""
    predicted = (probabilities[None, :] > thresholds[:, None]).astype(np.int64)
    cells = confusion_cells(labels, predicted)
    offsets = 4 * np.arange(len(thresholds))[:, None]
    counts = np.bincount((cells + offsets).ravel(), minlength=4 * len(thresholds)).reshape(-1, 4)
    return mcc_from_counts(counts)


def choose_threshold(validation: Predictions) -> ThresholdAnalysis | None:
    """The threshold with the best validation MCC (ties: the one nearest 0.5). Never chosen on a test set."""
    if len(set(validation.labels.tolist())) < 2:
        return None
    curve = mcc_by_threshold(validation.labels, validation.probabilities, THRESHOLDS)
    best = np.flatnonzero(np.isclose(curve, curve.max()))
    chosen = best[np.argmin(np.abs(THRESHOLDS[best] - 0.5))]
    at_half = mcc_by_threshold(validation.labels, validation.probabilities, np.array([0.5]))[0]
    return ThresholdAnalysis(
        chosen_on="validation",
        threshold=float(THRESHOLDS[chosen]),
        mcc_at_threshold=float(curve[chosen]),
        mcc_at_half=float(at_half),
        thresholds=THRESHOLDS.tolist(),
        mcc=[round(float(value), 6) for value in curve],
    )


def reliability(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, list[CalibrationBin]]:
    """Expected calibration error over P(acceptable), and the bins of the reliability diagram."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    bins = np.clip(np.digitize(probabilities, edges[1:-1]), 0, CALIBRATION_BINS - 1)  # 1.0 joins the last bin
    counts = np.bincount(bins, minlength=CALIBRATION_BINS)
    probability_sums = np.bincount(bins, weights=probabilities, minlength=CALIBRATION_BINS)
    acceptable_sums = np.bincount(bins, weights=labels, minlength=CALIBRATION_BINS)
    table, error = [], 0.0
    for index, count in enumerate(counts):
        mean = probability_sums[index] / count if count else None
        fraction = acceptable_sums[index] / count if count else None
        if count:
            error += count / len(labels) * abs(mean - fraction)
        table.append(CalibrationBin(float(edges[index]), float(edges[index + 1]), int(count), mean, fraction))
    return float(error), table


def by_source(run: Predictions) -> dict[str, SubsetScore]:
    sources = np.array(run.sources)
    return {
        source: subset_score(run.labels[sources == source], run.predictions[sources == source])
        for source in sorted(set(run.sources))
    }


def analyze_test_set(run: Predictions, threshold: ThresholdAnalysis | None) -> TestSetAnalysis:
    counts = np.bincount(confusion_cells(run.labels, run.predictions), minlength=4)
    error, bins = reliability(run.labels, run.probabilities)
    at_threshold = accuracy_at_threshold = None
    if threshold is not None:
        predicted = (run.probabilities > threshold.threshold).astype(np.int8)
        at_threshold = subset_score(run.labels, predicted, interval=False).matthews_correlation
        accuracy_at_threshold = float((predicted == run.labels).mean())
    return TestSetAnalysis(
        score=subset_score(run.labels, run.predictions),
        confusion_matrix=[[int(counts[0]), int(counts[1])], [int(counts[2]), int(counts[3])]],
        expected_calibration_error=error,
        reliability=bins,
        mcc_at_validation_threshold=at_threshold,
        accuracy_at_validation_threshold=accuracy_at_threshold,
        sources=by_source(run),
    )


def phenomenon_scores(glue_dev: Predictions, features: dict[str, np.ndarray]) -> dict[str, SubsetScore]:
    scores = {}
    for name, marked in features.items():
        mask = marked.astype(bool)
        scores[name] = subset_score(glue_dev.labels[mask], glue_dev.predictions[mask])
    return scores


# --- a run ----------------------------------------------------------------------------------------------------
def analyze_run(
    output_dir: Path,
    annotations_source: str | None = ANNOTATIONS_URL,
    *,
    minor_features: bool = False,
    cache_dir: str | None = None,
) -> RunAnalysis:
    """Analyse a run directory's predictions; write analysis.json, analysis.md and the charts there; return it.

    Needs predictions_glue_dev.tsv; the other splits are analysed when present (without
    predictions_validation.tsv, no threshold is chosen). With no annotations at hand, the phenomena are skipped
    with one log line and everything else is written.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    runs = {
        split: read_predictions(predictions_file(output_dir, split))
        for split in SPLITS
        if split == "glue_dev" or predictions_file(output_dir, split).is_file()
    }
    notes = []
    phenomena: dict[str, SubsetScore] = {}
    minor_phenomena: dict[str, SubsetScore] = {}
    annotation_info = None
    loaded = load_annotations(annotations_source, minor_features, cache_dir)  # bad annotations stop before any output
    if loaded is None:
        notes.append(f"Phenomena skipped: no annotations at hand; pass {HOW_TO_PROVIDE}.")
    else:
        major, minor = loaded
        glue_dev = runs["glue_dev"]
        note = check_rows(major, glue_dev.sources, glue_dev.labels, glue_dev.sentences, glue_dev.path)
        if note:
            logger.info(note)
            notes.append(note)
        phenomena = phenomenon_scores(glue_dev, major.features)
        if minor is not None:
            minor_phenomena = phenomenon_scores(glue_dev, minor.features)
        annotation_info = AnnotationInfo(
            str(annotations_source), str(major.path), str(minor.path) if minor else None, note
        )

    threshold = choose_threshold(runs["validation"]) if "validation" in runs else None
    if threshold is None:
        notes.append("No threshold chosen: predictions_validation.tsv is missing or has one class only.")
    analysis = RunAnalysis(
        run_dir=str(output_dir),
        test_sets={split: analyze_test_set(runs[split], threshold) for split in TEST_SPLITS if split in runs},
        threshold=threshold,
        phenomena=phenomena,
        minor_phenomena=minor_phenomena,
        annotations=annotation_info,
        bootstrap_resamples=RESAMPLES,
        notes=notes,
    )
    analysis.charts = write_charts(analysis, output_dir)
    analysis.seconds = round(time.perf_counter() - started, 3)
    write_text(output_dir / ANALYSIS_JSON, analysis.to_json())
    write_text(output_dir / ANALYSIS_MARKDOWN, analysis_markdown(analysis))
    logger.info("Analysis written to %s (%.2f s)", output_dir / ANALYSIS_JSON, analysis.seconds)
    return analysis


# --- for people: markdown, charts, W&B tables -----------------------------------------------------------------
def format_number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def mcc_cell(score: SubsetScore) -> str:
    if score.matthews_correlation is None:
        return f"n/a ({score.note})"
    cell = format_number(score.matthews_correlation)
    if score.mcc_ci_low is not None:
        cell += f" [{score.mcc_ci_low:.3f}, {score.mcc_ci_high:.3f}]"
    return f"{cell} ({score.note})" if score.note else cell


def _score_table(scores: dict[str, SubsetScore], first_column: str) -> str:
    lines = [f"| {first_column} | n | acceptable | MCC [95% CI] | accuracy |", "|---|---:|---:|---|---:|"]
    for name, score in scores.items():
        lines.append(
            f"| {name} | {score.n} | {score.n_acceptable} | {mcc_cell(score)} | {format_number(score.accuracy)} |"
        )
    return "\n".join(lines) + "\n"


def phenomena_markdown(analysis: RunAnalysis, minor: bool = False) -> str:
    """The per-phenomenon table on glue_dev (for the model card); empty when the phenomena were skipped."""
    scores = analysis.minor_phenomena if minor else analysis.phenomena
    if not scores:
        return ""
    return _score_table(scores, "phenomenon (glue_dev)")


def analysis_markdown(analysis: RunAnalysis) -> str:
    threshold = analysis.threshold
    at = f"validation threshold {threshold.threshold:.2f}" if threshold else "validation threshold (none)"
    lines = [
        "# What the model gets wrong",
        "",
        f"Run: `{analysis.run_dir}`. Intervals: 95% percentile bootstrap over {analysis.bootstrap_resamples} "
        "resamples of the sentences. Predictions at P(acceptable) > 0.5 unless said otherwise.",
        "",
        "## Test sets",
        "",
        f"| test set | n | MCC [95% CI] | accuracy | ECE | MCC at {at} | accuracy at it |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for split, test in analysis.test_sets.items():
        lines.append(
            f"| {split} | {test.score.n} | {mcc_cell(test.score)} | {format_number(test.score.accuracy)} | "
            f"{format_number(test.expected_calibration_error)} | {format_number(test.mcc_at_validation_threshold)} | "
            f"{format_number(test.accuracy_at_validation_threshold)} |"
        )
    lines += ["", "## Decision threshold", ""]
    if threshold:
        lines.append(
            f"Chosen on the validation split, never on a test set: {threshold.threshold:.2f} (validation MCC "
            f"{threshold.mcc_at_threshold:.3f}, against {threshold.mcc_at_half:.3f} at 0.5)."
        )
        lines += ["", f"![threshold]({THRESHOLD_CHART})"]
    else:
        lines.append("None chosen: the run has no predictions_validation.tsv with both classes.")
    lines += ["", "## Confusion matrices", "", "| test set | true \\ predicted | unacceptable | acceptable |"]
    lines.append("|---|---|---:|---:|")
    for split, test in analysis.test_sets.items():
        for name, row in zip(("unacceptable", "acceptable"), test.confusion_matrix, strict=True):
            lines.append(f"| {split} | {name} | {row[0]} | {row[1]} |")
    lines += ["", f"![confusion matrices]({CONFUSION_CHART})", "", "## Calibration", ""]
    lines.append(
        f"Expected calibration error over P(acceptable) in {CALIBRATION_BINS} equal-width bins (table above); "
        f"a calibrated model's points lie on the diagonal.\n\n![reliability]({RELIABILITY_CHART})"
    )
    lines += ["", "## Grammatical phenomena (glue_dev)", ""]
    if analysis.phenomena:
        lines += [phenomena_markdown(analysis), f"![phenomena]({PHENOMENA_CHART})", ""]
        if analysis.minor_phenomena:
            lines += ["### Minor features", "", phenomena_markdown(analysis, minor=True)]
    else:
        lines.append(f"Skipped: no annotations at hand; pass {HOW_TO_PROVIDE}.\n")
    lines += ["## Sentence sources", ""]
    for split, test in analysis.test_sets.items():
        lines += [f"### {split}", "", _score_table(test.sources, "source")]
    if analysis.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in analysis.notes), ""]
    return "\n".join(lines)


def wandb_tables(analysis: RunAnalysis) -> dict[str, pd.DataFrame]:
    """Frames to log as `wandb.Table(dataframe=...)`: phenomena (major and minor), sources, test sets."""

    def rows(scores: dict[str, SubsetScore], key: str, **extra: str) -> list[dict]:
        return [{**extra, key: name, **dataclasses.asdict(score)} for name, score in scores.items()]

    tables = {
        "phenomena": pd.DataFrame(rows(analysis.phenomena, "phenomenon")),
        "sources": pd.DataFrame(
            [row for split, test in analysis.test_sets.items() for row in rows(test.sources, "source", split=split)]
        ),
        "test_sets": pd.DataFrame(
            [
                {
                    "split": split,
                    **dataclasses.asdict(test.score),
                    "expected_calibration_error": test.expected_calibration_error,
                    "mcc_at_validation_threshold": test.mcc_at_validation_threshold,
                    "validation_threshold": analysis.threshold.threshold if analysis.threshold else None,
                }
                for split, test in analysis.test_sets.items()
            ]
        ),
    }
    if analysis.minor_phenomena:
        tables["minor_phenomena"] = pd.DataFrame(rows(analysis.minor_phenomena, "phenomenon"))
    return tables


def write_charts(analysis: RunAnalysis, output_dir: Path) -> list[str]:
    """The PNGs there is data for; returns their file names (for analysis.json and W&B images)."""
    written = []
    if analysis.phenomena:
        plot_phenomena(analysis.phenomena, output_dir / PHENOMENA_CHART)
        written.append(PHENOMENA_CHART)
    plot_reliability(analysis.test_sets, output_dir / RELIABILITY_CHART)
    plot_confusion_matrices(analysis.test_sets, output_dir / CONFUSION_CHART)
    written += [RELIABILITY_CHART, CONFUSION_CHART]
    if analysis.threshold:
        plot_threshold(analysis.threshold, output_dir / THRESHOLD_CHART)
        written.append(THRESHOLD_CHART)
    return written


def plot_phenomena(scores: dict[str, SubsetScore], path: Path) -> None:
    names = list(scores)[::-1]  # the file's order, top to bottom
    figure, axes = pyplot().subplots(figsize=(7, 0.3 * len(names) + 1.2))
    rows = [row for row, name in enumerate(names) if scores[name].matthews_correlation is not None]
    mcc = np.array([scores[names[row]].matthews_correlation for row in rows])
    # A subset too small for an interval gets none: its bar has zero length.
    low = np.array([_or(scores[names[row]].mcc_ci_low, value) for row, value in zip(rows, mcc, strict=True)])
    high = np.array([_or(scores[names[row]].mcc_ci_high, value) for row, value in zip(rows, mcc, strict=True)])
    axes.errorbar(mcc, rows, xerr=[mcc - low, high - mcc], fmt="o", color="tab:blue", capsize=3)
    for row, name in enumerate(names):
        if scores[name].matthews_correlation is None:
            axes.text(0, row, "  MCC undefined (one class)", va="center", fontsize="small", color="gray")
    axes.set_yticks(range(len(names)), [f"{name} (n={scores[name].n})" for name in names])
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set(title="MCC per phenomenon on glue_dev, 95% bootstrap interval", xlabel="MCC", xlim=(-1, 1))
    axes.grid(axis="x", alpha=0.3)
    save_figure(figure, path)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def plot_reliability(test_sets: dict[str, TestSetAnalysis], path: Path) -> None:
    figure, all_axes = pyplot().subplots(1, len(test_sets), figsize=(4 * len(test_sets), 4), squeeze=False)
    for axes, (split, test) in zip(all_axes[0], test_sets.items(), strict=True):
        filled = [b for b in test.reliability if b.n]
        axes.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
        axes.plot([b.mean_probability for b in filled], [b.fraction_acceptable for b in filled], "o-", color="tab:blue")
        axes.set(title=f"{split}: ECE {test.expected_calibration_error:.3f}", xlim=(0, 1), ylim=(0, 1))
        axes.set(xlabel="mean P(acceptable) in bin", ylabel="fraction acceptable")
        axes.grid(alpha=0.3)
    save_figure(figure, path)


def plot_confusion_matrices(test_sets: dict[str, TestSetAnalysis], path: Path) -> None:
    figure, all_axes = pyplot().subplots(1, len(test_sets), figsize=(3.6 * len(test_sets), 3.4), squeeze=False)
    for axes, (split, test) in zip(all_axes[0], test_sets.items(), strict=True):
        matrix = np.array(test.confusion_matrix)
        axes.imshow(matrix, cmap="Blues")
        for (row, column), count in np.ndenumerate(matrix):
            color = "white" if count > matrix.max() / 2 else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=color)
        axes.set_xticks([0, 1], ["unacc.", "acc."])
        axes.set_yticks([0, 1], ["unacc.", "acc."])
        axes.set(title=split, xlabel="predicted", ylabel="true")
    save_figure(figure, path)


def plot_threshold(threshold: ThresholdAnalysis, path: Path) -> None:
    figure, axes = pyplot().subplots(figsize=(6, 4))
    axes.plot(threshold.thresholds, threshold.mcc, color="tab:blue", label="validation MCC")
    axes.axvline(0.5, color="gray", linestyle="--", linewidth=0.8, label="0.5")
    axes.axvline(threshold.threshold, color="tab:red", linewidth=0.8, label=f"chosen {threshold.threshold:.2f}")
    axes.set(title="MCC against the threshold (validation split)", xlabel="threshold on P(acceptable)", ylabel="MCC")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save_figure(figure, path)
