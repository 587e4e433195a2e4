"""Several runs side by side for cola-compare: is run B really better than run A, or just another seed?

Two runs that predicted the same sentences: a paired bootstrap of their MCC difference on glue_dev. Two groups of
seeds: Welch's t-test on their glue_dev MCCs. Either way, the runs that collapsed (one class) are named beside it.
Beside the tests, the per-phenomenon table of every run or group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cola_hf.analysis.run_analysis import (
    ANALYSIS_JSON,
    BOOTSTRAP_SEED,
    RunAnalysis,
    SubsetScore,
    confusion_cells,
    format_number,
    matthews_correlation,
    mcc_cell,
    mcc_from_counts,
    phenomenon_scores,
    resampled_counts,
)
from cola_hf.data.annotations import ANNOTATIONS_URL, HOW_TO_PROVIDE, check_rows, load_annotations
from cola_hf.errors import UsageError
from cola_hf.predictions_tsv import Predictions, predictions_file, read_predictions
from cola_hf.results import RunResults

TEST_RESAMPLES = 10_000


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
    cells_a, cells_b = confusion_cells(a.labels, a.predictions), confusion_cells(b.labels, b.predictions)
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, 1000):  # chunks keep the index matrix small
        indices = rng.integers(0, len(cells_a), (min(1000, resamples - start), len(cells_a)))
        counts_a, counts_b = resampled_counts(cells_a, indices), resampled_counts(cells_b, indices)
        differences.append(mcc_from_counts(counts_b) - mcc_from_counts(counts_a))
    resampled = np.concatenate(differences)
    mcc_a = float(mcc_from_counts(np.bincount(cells_a, minlength=4)))
    mcc_b = float(mcc_from_counts(np.bincount(cells_b, minlength=4)))
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
        glue_dev = read_predictions(predictions_file(run_dir, "glue_dev"))
        check_rows(major, glue_dev.sources, glue_dev.labels, glue_dev.sentences, glue_dev.path)
        features = {**major.features, **(minor.features if minor else {})}
        return phenomenon_scores(glue_dev, features)


def phenomena_comparison(
    labels: list[str],
    groups: list[list[Path]],
    annotations_source: str | None = ANNOTATIONS_URL,
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
            display[label] = {name: mcc_cell(per_run[members[0]][name]) for name in names}
        else:
            display[label] = {name: _spread([s[name].matthews_correlation for s in per_run.values()]) for name in names}
        display.setdefault("n", {name: next(iter(per_run.values()))[name].n for name in names})
    frame = pd.DataFrame(display)
    frame = frame[["n", *labels]].rename_axis("phenomenon").reset_index()
    return frame, pd.DataFrame(long_rows)


def _spread(values: list[float | None]) -> str:
    defined = [value for value in values if value is not None]
    if len(defined) < 2:
        return format_number(defined[0]) if defined else "n/a (one class)"
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
            a = read_predictions(predictions_file(baseline[0], "glue_dev"))
            b = read_predictions(predictions_file(members[0], "glue_dev"))
            results.append((baseline_label, label, paired_bootstrap(a, b)))
        elif len(baseline) > 1 and len(members) > 1:
            results.append((baseline_label, label, welch_test(_glue_dev_mccs(baseline), _glue_dev_mccs(members))))
        else:
            raise UsageError(
                f"{label}: cannot test a single run against a group of seeds; give two runs or two seed directories"
            )
    return results


def collapsed_runs(members: list[Path]) -> list[Path]:
    """The runs whose tested model predicted one class for every validation sentence (results.json's epochs)."""
    return [run_dir for run_dir in members if RunResults.load(run_dir).collapsed]


def collapse_note(labels: list[str], groups: list[list[Path]]) -> str:
    """A line per run or group that holds collapsed runs, naming them; empty when none did.

    A collapsed run's MCC of 0 is a failure of training, not a draw from the recipe's spread: it pulls a group's
    mean down and its std up, and Welch's test then weighs a few failures as if they were noise.
    """
    lines = []
    for label, members in zip(labels, groups, strict=True):
        collapsed = collapsed_runs(members)
        if collapsed:
            names = ", ".join(run_dir.name for run_dir in collapsed)
            lines.append(
                f"- {label}: {len(collapsed)} of {len(members)} runs collapsed (one class on validation, MCC 0): "
                f"{names}; its figures include them"
            )
    return "\nCollapsed runs:\n" + "\n".join(lines) + "\n" if lines else ""


def _glue_dev_mccs(members: list[Path]) -> list[float]:
    values = []
    for run_dir in members:
        run = read_predictions(predictions_file(run_dir, "glue_dev"))
        values.append(matthews_correlation(run.labels, run.predictions))
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
        lines.append(f"| {label_a} | {label_b} | {test} | {middle} | {format_number(result.p_value, 4)} |")
    return "\n".join(lines) + "\n"
