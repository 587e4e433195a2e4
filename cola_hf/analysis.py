"""What a model gets wrong, from a run directory's predictions_<split>.tsv files: analysis.json, analysis.md, charts.

Per test set: MCC with a bootstrap interval, confusion matrix, calibration (ECE, reliability diagram), the
decision threshold chosen on the validation split, and scores per sentence source. On glue_dev, scores per
grammatical phenomenon (cola_hf.phenomena). Significance tests for cola-compare: a paired bootstrap of two runs'
MCC difference on the same sentences, Welch's t-test for two groups of seeds.

Bootstraps are vectorised: each resample's confusion counts come from one `np.bincount`, so the whole analysis
takes well under two seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cola_hf.errors import UsageError  # noqa: E402
from cola_hf.phenomena import DEFAULT_ANNOTATIONS_URL, HOW_TO_PROVIDE, check_rows, load_annotations  # noqa: E402
from cola_hf.reporting import PREDICTION_COLUMNS, atomic_path, write_text  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ANNOTATIONS_URL", "RunAnalysis", "analyze_run", "phenomena_markdown", "wandb_tables"]

SPLITS = ("validation", "out_of_domain_dev", "in_domain_dev", "glue_dev")
TEST_SPLITS = SPLITS[1:]
ANALYSIS_JSON = "analysis.json"
SCHEMA_VERSION = 1
RESAMPLES = 1000  # per interval in a run; percentile intervals, seeded so a rerun gives the same figures
TEST_RESAMPLES = 10_000  # for the significance tests of cola-compare, which can afford them
BOOTSTRAP_SEED = 0
CALIBRATION_BINS = 10
THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
ONE_CLASS_NOTE = "one class only: MCC undefined"
PREDICTED_ONE_CLASS_NOTE = "the model predicts one class here: MCC 0 by convention"
CHARTS = ("phenomena.png", "reliability.png", "confusion_matrix.png", "threshold.png")


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
class RunAnalysis:
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunAnalysis:
        return _from_dict(cls, json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> RunAnalysis:
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise UsageError(f"{path}: cannot read ({type(err).__name__}: {err})") from err


def _from_dict(kind: typing.Any, value: typing.Any) -> typing.Any:
    """Rebuild a value of type `kind` (dataclass, dict[str, X], list[X], X | None) from its JSON form."""
    if value is None:
        return None
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(
            **{f.name: _from_dict(hints[f.name], value[f.name]) for f in dataclasses.fields(kind) if f.name in value}
        )
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return _from_dict(next(arg for arg in args if arg is not type(None)), value)
    if origin is dict:
        return {key: _from_dict(args[1], item) for key, item in value.items()}
    if origin is list:
        return [_from_dict(args[0], item) for item in value]
    return value


# --- predictions files ----------------------------------------------------------------------------------------
@dataclass
class Predictions:
    """One predictions_<split>.tsv: gold labels, 0.5-threshold predictions, P(acceptable), in file order."""

    path: Path
    sources: list[str]
    sentences: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray


def read_predictions(path: str | Path) -> Predictions:
    """Read a predictions TSV (header PREDICTION_COLUMNS, no quoting); a bad row raises naming file and row."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as err:
        raise UsageError(f"{path}: no such file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read ({err})") from err
    lines = text.rstrip("\n").split("\n")
    if lines[0].rstrip("\r").split("\t") != list(PREDICTION_COLUMNS):
        raise UsageError(f"{path}:1: wrong header; expected {chr(9).join(PREDICTION_COLUMNS)!r}")
    sources, sentences, labels, predictions, probabilities = [], [], [], [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").split("\t")
        try:
            if len(fields) != len(PREDICTION_COLUMNS) or fields[1] not in "01" or fields[3] not in "01":
                raise ValueError
            probability = float(fields[4])
            if not 0.0 <= probability <= 1.0:
                raise ValueError
        except ValueError:
            raise UsageError(
                f"{path}:{number}: expected source, label 0/1, sentence, prediction 0/1, probability in [0, 1]"
            ) from None
        sources.append(fields[0])
        labels.append(fields[1] == "1")
        sentences.append(fields[2])
        predictions.append(fields[3] == "1")
        probabilities.append(probability)
    if not sentences:
        raise UsageError(f"{path}: no rows")
    return Predictions(
        path, sources, sentences, np.array(labels, np.int8), np.array(predictions, np.int8), np.array(probabilities)
    )


# --- vectorised scores ----------------------------------------------------------------------------------------
def _mcc_from_counts(counts: np.ndarray) -> np.ndarray:
    """MCC from confusion counts [..., (tn, fp, fn, tp)]; 0 where a margin is empty, as sklearn defines it."""
    tn, fp, fn, tp = (counts[..., cell].astype(float) for cell in range(4))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)


def _cells(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Each sentence's confusion cell: 0 tn, 1 fp, 2 fn, 3 tp."""
    return 2 * labels.astype(np.int64) + predictions


def _resampled_counts(cells: np.ndarray, indices: np.ndarray) -> np.ndarray:
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
    counts = _resampled_counts(_cells(labels, predictions), rng.integers(0, len(labels), (resamples, len(labels))))
    values = _mcc_from_counts(counts)[_two_classes(counts)]
    if len(values) < resamples / 2:  # too few resamples hold both classes for an interval to mean anything
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def subset_score(labels: np.ndarray, predictions: np.ndarray, interval: bool = True) -> SubsetScore:
    counts = np.bincount(_cells(labels, predictions), minlength=4)
    n, n_acceptable = len(labels), int(labels.sum())
    accuracy = float((counts[0] + counts[3]) / n) if n else None
    if n == 0 or not _two_classes(counts):
        return SubsetScore(n, n_acceptable, None, accuracy, note=ONE_CLASS_NOTE if n else "no sentences")
    low, high = bootstrap_mcc_interval(labels, predictions) if interval else (None, None)
    predicted_classes = int(counts[0] + counts[2] > 0) + int(counts[1] + counts[3] > 0)
    note = PREDICTED_ONE_CLASS_NOTE if predicted_classes < 2 else ""
    return SubsetScore(n, n_acceptable, float(_mcc_from_counts(counts)), accuracy, low, high, note)


def mcc_by_threshold(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """MCC of `probabilities > t` for every threshold t, in one pass."""
    predicted = (probabilities[None, :] > thresholds[:, None]).astype(np.int64)
    cells = _cells(labels, predicted)
    offsets = 4 * np.arange(len(thresholds))[:, None]
    counts = np.bincount((cells + offsets).ravel(), minlength=4 * len(thresholds)).reshape(-1, 4)
    return _mcc_from_counts(counts)


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
    counts = np.bincount(_cells(run.labels, run.predictions), minlength=4)
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
    annotations_source: str | None = DEFAULT_ANNOTATIONS_URL,
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
        split: read_predictions(output_dir / f"predictions_{split}.tsv")
        for split in SPLITS
        if split == "glue_dev" or (output_dir / f"predictions_{split}.tsv").is_file()
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
    write_text(output_dir / "analysis.md", analysis_markdown(analysis))
    logger.info("Analysis written to %s (%.2f s)", output_dir / ANALYSIS_JSON, analysis.seconds)
    return analysis


# --- for people: markdown, charts, W&B tables -----------------------------------------------------------------
def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mcc_cell(score: SubsetScore) -> str:
    if score.matthews_correlation is None:
        return f"n/a ({score.note})"
    cell = _number(score.matthews_correlation)
    if score.mcc_ci_low is not None:
        cell += f" [{score.mcc_ci_low:.3f}, {score.mcc_ci_high:.3f}]"
    return f"{cell} ({score.note})" if score.note else cell


def _score_table(scores: dict[str, SubsetScore], first_column: str) -> str:
    lines = [f"| {first_column} | n | acceptable | MCC [95% CI] | accuracy |", "|---|---:|---:|---|---:|"]
    for name, score in scores.items():
        lines.append(f"| {name} | {score.n} | {score.n_acceptable} | {_mcc_cell(score)} | {_number(score.accuracy)} |")
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
            f"| {split} | {test.score.n} | {_mcc_cell(test.score)} | {_number(test.score.accuracy)} | "
            f"{_number(test.expected_calibration_error)} | {_number(test.mcc_at_validation_threshold)} | "
            f"{_number(test.accuracy_at_validation_threshold)} |"
        )
    lines += ["", "## Decision threshold", ""]
    if threshold:
        lines.append(
            f"Chosen on the validation split, never on a test set: {threshold.threshold:.2f} (validation MCC "
            f"{threshold.mcc_at_threshold:.3f}, against {threshold.mcc_at_half:.3f} at 0.5)."
        )
        lines += ["", "![threshold](threshold.png)"]
    else:
        lines.append("None chosen: the run has no predictions_validation.tsv with both classes.")
    lines += ["", "## Confusion matrices", "", "| test set | true \\ predicted | unacceptable | acceptable |"]
    lines.append("|---|---|---:|---:|")
    for split, test in analysis.test_sets.items():
        for name, row in zip(("unacceptable", "acceptable"), test.confusion_matrix, strict=True):
            lines.append(f"| {split} | {name} | {row[0]} | {row[1]} |")
    lines += ["", "![confusion matrices](confusion_matrix.png)", "", "## Calibration", ""]
    lines.append(
        f"Expected calibration error over P(acceptable) in {CALIBRATION_BINS} equal-width bins (table above); "
        "a calibrated model's points lie on the diagonal.\n\n![reliability](reliability.png)"
    )
    lines += ["", "## Grammatical phenomena (glue_dev)", ""]
    if analysis.phenomena:
        lines += [phenomena_markdown(analysis), "![phenomena](phenomena.png)", ""]
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


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def write_charts(analysis: RunAnalysis, output_dir: Path) -> list[str]:
    """The PNGs there is data for; returns their file names (for analysis.json and W&B images)."""
    written = []
    if analysis.phenomena:
        plot_phenomena(analysis.phenomena, output_dir / "phenomena.png")
        written.append("phenomena.png")
    plot_reliability(analysis.test_sets, output_dir / "reliability.png")
    plot_confusion_matrices(analysis.test_sets, output_dir / "confusion_matrix.png")
    written += ["reliability.png", "confusion_matrix.png"]
    if analysis.threshold:
        plot_threshold(analysis.threshold, output_dir / "threshold.png")
        written.append("threshold.png")
    return written


def plot_phenomena(scores: dict[str, SubsetScore], path: Path) -> None:
    names = list(scores)[::-1]  # the file's order, top to bottom
    figure, axes = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
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
    _save(figure, path)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def plot_reliability(test_sets: dict[str, TestSetAnalysis], path: Path) -> None:
    figure, all_axes = plt.subplots(1, len(test_sets), figsize=(4 * len(test_sets), 4), squeeze=False)
    for axes, (split, test) in zip(all_axes[0], test_sets.items(), strict=True):
        filled = [b for b in test.reliability if b.n]
        axes.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
        axes.plot([b.mean_probability for b in filled], [b.fraction_acceptable for b in filled], "o-", color="tab:blue")
        axes.set(title=f"{split}: ECE {test.expected_calibration_error:.3f}", xlim=(0, 1), ylim=(0, 1))
        axes.set(xlabel="mean P(acceptable) in bin", ylabel="fraction acceptable")
        axes.grid(alpha=0.3)
    _save(figure, path)


def plot_confusion_matrices(test_sets: dict[str, TestSetAnalysis], path: Path) -> None:
    figure, all_axes = plt.subplots(1, len(test_sets), figsize=(3.6 * len(test_sets), 3.4), squeeze=False)
    for axes, (split, test) in zip(all_axes[0], test_sets.items(), strict=True):
        matrix = np.array(test.confusion_matrix)
        axes.imshow(matrix, cmap="Blues")
        for (row, column), count in np.ndenumerate(matrix):
            color = "white" if count > matrix.max() / 2 else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=color)
        axes.set_xticks([0, 1], ["unacc.", "acc."])
        axes.set_yticks([0, 1], ["unacc.", "acc."])
        axes.set(title=split, xlabel="predicted", ylabel="true")
    _save(figure, path)


def plot_threshold(threshold: ThresholdAnalysis, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(threshold.thresholds, threshold.mcc, color="tab:blue", label="validation MCC")
    axes.axvline(0.5, color="gray", linestyle="--", linewidth=0.8, label="0.5")
    axes.axvline(threshold.threshold, color="tab:red", linewidth=0.8, label=f"chosen {threshold.threshold:.2f}")
    axes.set(title="MCC against the threshold (validation split)", xlabel="threshold on P(acceptable)", ylabel="MCC")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)


# --- significance ---------------------------------------------------------------------------------------------
@dataclass
class PairedBootstrap:
    """MCC of run b minus run a on the same sentences, its 95% interval and two-sided p-value."""

    test: str
    n: int
    resamples: int
    mcc_a: float
    mcc_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass
class SeedGroupTest:
    """Mean glue_dev MCC of group b minus group a over their seeds, with Welch's t-test."""

    test: str
    n_a: int
    n_b: int
    mean_a: float
    std_a: float
    mean_b: float
    std_b: float
    difference: float
    statistic: float | None
    degrees_of_freedom: float | None
    p_value: float | None


def paired_bootstrap(
    a: Predictions, b: Predictions, resamples: int = TEST_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> PairedBootstrap:
    """Resample the sentences (the same rows for both runs); p: how often the centred difference is as large.

    The centred bootstrap distribution stands for the null hypothesis (Berg-Kirkpatrick et al. 2012); p is
    two-sided and counts the observed resample, so it is never 0. A run against itself gives 0 and p = 1.
    """
    if len(a.sentences) != len(b.sentences):
        raise UsageError(f"{b.path}: {len(b.sentences)} rows, but {a.path} has {len(a.sentences)}")
    for row, (first, second) in enumerate(zip(a.sentences, b.sentences, strict=True), start=2):
        if first != second or a.labels[row - 2] != b.labels[row - 2]:
            raise UsageError(f"{b.path}:{row}: not the same sentence and label as {a.path}:{row}")
    cells_a, cells_b = _cells(a.labels, a.predictions), _cells(b.labels, b.predictions)
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, 1000):  # chunks keep the index matrix small
        indices = rng.integers(0, len(cells_a), (min(1000, resamples - start), len(cells_a)))
        counts_a, counts_b = _resampled_counts(cells_a, indices), _resampled_counts(cells_b, indices)
        differences.append(_mcc_from_counts(counts_b) - _mcc_from_counts(counts_a))
    resampled = np.concatenate(differences)
    mcc_a = float(_mcc_from_counts(np.bincount(cells_a, minlength=4)))
    mcc_b = float(_mcc_from_counts(np.bincount(cells_b, minlength=4)))
    observed = mcc_b - mcc_a
    as_large = np.count_nonzero(np.abs(resampled - observed) >= abs(observed) - 1e-12)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return PairedBootstrap(
        test="paired bootstrap of the MCC difference",
        n=len(cells_a),
        resamples=resamples,
        mcc_a=mcc_a,
        mcc_b=mcc_b,
        difference=observed,
        ci_low=float(low),
        ci_high=float(high),
        p_value=float((as_large + 1) / (resamples + 1)),
    )


def welch_test(mcc_a: list[float], mcc_b: list[float]) -> SeedGroupTest:
    """Welch's t-test (unequal variances) of two groups of seeds' MCCs; std is the sample one (n - 1)."""
    from scipy import stats

    if len(mcc_a) < 2 or len(mcc_b) < 2:
        raise UsageError(f"Welch's t-test needs at least 2 seeds per group; found {len(mcc_a)} and {len(mcc_b)}")
    a, b = np.array(mcc_a), np.array(mcc_b)
    statistic = degrees = p_value = None
    if a.std() > 0 or b.std() > 0:  # both constant: no variance to test against
        result = stats.ttest_ind(b, a, equal_var=False)
        statistic, degrees, p_value = float(result.statistic), float(result.df), float(result.pvalue)
    return SeedGroupTest(
        test="Welch's t-test",
        n_a=len(a),
        n_b=len(b),
        mean_a=float(a.mean()),
        std_a=float(a.std(ddof=1)),
        mean_b=float(b.mean()),
        std_b=float(b.std(ddof=1)),
        difference=float(b.mean() - a.mean()),
        statistic=statistic,
        degrees_of_freedom=degrees,
        p_value=p_value,
    )


# --- several runs (cola-compare) ------------------------------------------------------------------------------
class _GlueDevScorer:
    """Phenomena of runs from their analysis.json, or from predictions_glue_dev.tsv and the annotations."""

    def __init__(self, annotations_source: str | None, minor_features: bool, cache_dir: str | None):
        self.source, self.minor_features, self.cache_dir = annotations_source, minor_features, cache_dir
        self._annotations: tuple | None = None

    def phenomena(self, run_dir: Path) -> dict[str, SubsetScore]:
        saved = run_dir / ANALYSIS_JSON
        if saved.is_file():
            analysis = RunAnalysis.load(saved)
            scores = {**analysis.phenomena, **analysis.minor_phenomena} if self.minor_features else analysis.phenomena
            if analysis.phenomena and (analysis.minor_phenomena or not self.minor_features):
                return scores
        if self._annotations is None:
            self._annotations = load_annotations(self.source, self.minor_features, self.cache_dir)
            if self._annotations is None:
                raise UsageError(
                    f"{run_dir}: no phenomena in {ANALYSIS_JSON} and no annotations; pass {HOW_TO_PROVIDE}"
                )
        major, minor = self._annotations
        glue_dev = read_predictions(run_dir / "predictions_glue_dev.tsv")
        check_rows(major, glue_dev.sources, glue_dev.labels, glue_dev.sentences, glue_dev.path)
        features = {**major.features, **(minor.features if minor else {})}
        return phenomenon_scores(glue_dev, features)


def phenomena_comparison(
    labels: list[str],
    groups: list[list[Path]],
    annotations_source: str | None = DEFAULT_ANNOTATIONS_URL,
    minor_features: bool = False,
    cache_dir: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-phenomenon MCC side by side: a display frame (one column per run or group) and one row per run.

    A single run shows its MCC and 95% interval; a group of seeds the mean ± sample std of its runs' MCCs.
    With minor features, a name used by both lists (Simple, Imperative) shows the minor one.
    """
    scorer = _GlueDevScorer(annotations_source, minor_features, cache_dir)
    long_rows, display = [], {}
    for label, members in zip(labels, groups, strict=True):
        per_run = {run_dir: scorer.phenomena(run_dir) for run_dir in members}
        for run_dir, scores in per_run.items():
            long_rows += [
                {"group": label, "run": str(run_dir), "phenomenon": name, **dataclasses.asdict(score)}
                for name, score in scores.items()
            ]
        names = list(next(iter(per_run.values())))
        if len(members) == 1:
            display[label] = {name: _mcc_cell(per_run[members[0]][name]) for name in names}
        else:
            display[label] = {name: _spread([s[name].matthews_correlation for s in per_run.values()]) for name in names}
        display.setdefault("n", {name: next(iter(per_run.values()))[name].n for name in names})
    frame = pd.DataFrame(display)
    frame = frame[["n", *labels]].rename_axis("phenomenon").reset_index()
    return frame, pd.DataFrame(long_rows)


def _spread(values: list[float | None]) -> str:
    defined = [value for value in values if value is not None]
    if len(defined) < 2:
        return _number(defined[0]) if defined else "n/a (one class)"
    return f"{np.mean(defined):.3f} ± {np.std(defined, ddof=1):.3f} ({len(defined)} seeds)"


def significance_tests(
    labels: list[str], groups: list[list[Path]]
) -> list[tuple[str, str, PairedBootstrap | SeedGroupTest]]:
    """Every run or group against the first, on glue_dev: paired bootstrap for two runs, Welch for two groups."""
    if len(groups) < 2:
        raise UsageError("--significance needs two runs, or two directories of seed runs, to compare")
    baseline_label, baseline = labels[0], groups[0]
    results = []
    for label, members in zip(labels[1:], groups[1:], strict=True):
        if len(baseline) == 1 and len(members) == 1:
            a = read_predictions(baseline[0] / "predictions_glue_dev.tsv")
            b = read_predictions(members[0] / "predictions_glue_dev.tsv")
            results.append((baseline_label, label, paired_bootstrap(a, b)))
        elif len(baseline) > 1 and len(members) > 1:
            results.append((baseline_label, label, welch_test(_glue_dev_mccs(baseline), _glue_dev_mccs(members))))
        else:
            raise UsageError(
                f"{label}: cannot test a single run against a group of seeds; give two runs or two seed directories"
            )
    return results


def _glue_dev_mccs(members: list[Path]) -> list[float]:
    values = []
    for run_dir in members:
        run = read_predictions(run_dir / "predictions_glue_dev.tsv")
        values.append(float(_mcc_from_counts(np.bincount(_cells(run.labels, run.predictions), minlength=4))))
    return values


def significance_markdown(results: list[tuple[str, str, PairedBootstrap | SeedGroupTest]]) -> str:
    lines = ["| a | b | test | MCC a | MCC b | b - a | 95% CI / t (df) | p |", "|---|---|---|---:|---:|---:|---|---:|"]
    for label_a, label_b, result in results:
        if isinstance(result, PairedBootstrap):
            middle = f"{result.mcc_a:.3f} | {result.mcc_b:.3f} | {result.difference:+.3f} | "
            middle += f"[{result.ci_low:+.3f}, {result.ci_high:+.3f}]"
            test = f"paired bootstrap, {result.resamples} resamples of {result.n} sentences"
        else:
            middle = f"{result.mean_a:.3f} ± {result.std_a:.3f} | {result.mean_b:.3f} ± {result.std_b:.3f} | "
            t = "n/a" if result.statistic is None else f"t = {result.statistic:.2f} ({result.degrees_of_freedom:.1f})"
            middle += f"{result.difference:+.3f} | {t}"
            test = f"Welch's t-test, {result.n_a} vs {result.n_b} seeds"
        lines.append(f"| {label_a} | {label_b} | {test} | {middle} | {_number(result.p_value, 4)} |")
    return "\n".join(lines) + "\n"
