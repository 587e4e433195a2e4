"""What a run prefers in BLiMP's minimal pairs: predictions_blimp.tsv, blimp.json/.md and its chart, beside the
published figures of GPT-2, an LSTM, a 5-gram model and humans; and the paired test between two runs.

Two measures. A pair is right when the classifier gives its acceptable sentence the higher P(acceptable): the
pair preference the BLiMP paper scores language models by (theirs compare the two sentences' probabilities).
Ties count as wrong, as a language model's do. Each sentence can also be judged on its own, acceptable when
P(acceptable) > the run's decision threshold: a sentence-level MCC and accuracy over all 134,000 sentences.

This module is the one owner of predictions_blimp.tsv: `write_blimp_predictions` and `read_blimp_predictions`.
Bootstraps draw binomial counts: resampling n right/wrong pairs with replacement gives exactly a
Binomial(n, accuracy) number of right ones, so 1,000 resamples of 67,000 pairs take microseconds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from cola_hf.analysis.run_analysis import BOOTSTRAP_SEED, RESAMPLES, matthews_correlation
from cola_hf.analysis.significance import SeedGroupTest, welch_test
from cola_hf.charts import pyplot, save_figure
from cola_hf.errors import UsageError
from cola_hf.file_io import JsonRecord, read_tsv, write_text
from cola_hf.run_files import BLIMP_CHART, BLIMP_JSON, BLIMP_MARKDOWN
from cola_hf.run_files import BLIMP_PREDICTIONS as PREDICTIONS_FILE

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("UID", "pairID", "linguistics_term", "prob_good", "prob_bad")
SCHEMA_VERSION = 1
# The paper's 12 phenomena: the data's two s-selection paradigms are argument structure there.
PHENOMENON_OF_TERM = {"s-selection": "argument_structure"}
# The published figures, by their key in models_summary.jsonl (and "human"); the four the tables show first.
REFERENCE_NAMES = {"gpt2": "GPT-2", "lstm": "LSTM", "ngram": "5-gram", "human": "human", "txl": "Transformer-XL"}
SHOWN_REFERENCES = ("gpt2", "lstm", "ngram", "human")
FURTHEST_BELOW = 10  # paradigms listed where the model is furthest below GPT-2
CITATION = (
    "Warstadt et al. 2020, BLiMP: The Benchmark of Linguistic Minimal Pairs for English, TACL 8:377-392 "
    "(figures as corrected in the authors' 2021 erratum)"
)


def phenomenon(linguistics_term: str) -> str:
    """The paper's phenomenon of a paradigm's `linguistics_term`."""
    return PHENOMENON_OF_TERM.get(linguistics_term, linguistics_term)


# --- predictions_blimp.tsv ------------------------------------------------------------------------------------
@dataclass
class BlimpPredictions:
    """One row per pair: its paradigm, phenomenon, and P(acceptable) of the good and the bad sentence."""

    uids: list[str]
    pair_ids: list[str]
    terms: list[str]
    prob_good: np.ndarray
    prob_bad: np.ndarray
    path: Path | None = None

    @property
    def correct(self) -> np.ndarray:
        """The model prefers the acceptable sentence; a tie is not a preference."""
        return self.prob_good > self.prob_bad

    @property
    def phenomena(self) -> np.ndarray:
        return np.array([phenomenon(term) for term in self.terms])

    def keys(self) -> list[tuple[str, str]]:
        return list(zip(self.uids, self.pair_ids, strict=True))


def pair_predictions(
    pairs: Mapping[str, Sequence[str]],
    sentence_pairs: np.ndarray,
    sentence_labels: np.ndarray,
    probabilities: np.ndarray,
) -> BlimpPredictions:
    """Each pair's two probabilities from the scored sentences (each sentence's pair row and label, 1 = good)."""
    count = len(pairs["UID"])
    sentence_pairs, sentence_labels = np.asarray(sentence_pairs), np.asarray(sentence_labels)
    by_label = {}
    for label in (1, 0):
        rows = sentence_labels == label
        if sorted(sentence_pairs[rows].tolist()) != list(range(count)):
            raise ValueError(f"expected one sentence of label {label} for each of {count} pairs")
        values = np.empty(count)
        values[sentence_pairs[rows]] = probabilities[rows]
        by_label[label] = values
    return BlimpPredictions(
        list(pairs["UID"]), [str(p) for p in pairs["pairID"]], list(pairs["linguistics_term"]), by_label[1], by_label[0]
    )


def write_blimp_predictions(path: str | Path, predictions: BlimpPredictions) -> None:
    """predictions_blimp.tsv; probabilities written so that they read back exactly (shortest round-trip repr)."""
    lines = ["\t".join(PREDICTION_COLUMNS)]
    for uid, pair_id, term, good, bad in zip(
        predictions.uids,
        predictions.pair_ids,
        predictions.terms,
        predictions.prob_good.tolist(),
        predictions.prob_bad.tolist(),
        strict=True,
    ):
        lines.append(f"{uid}\t{pair_id}\t{term}\t{good!r}\t{bad!r}")
    write_text(path, "\n".join(lines) + "\n")


def read_blimp_predictions(path: str | Path) -> BlimpPredictions:
    """Read predictions_blimp.tsv; a bad row raises naming the file and the line."""
    path = Path(path)
    header, rows = read_tsv(path)
    if header != list(PREDICTION_COLUMNS):
        raise UsageError(f"{path}:1: wrong header; expected {chr(9).join(PREDICTION_COLUMNS)!r}")
    uids, pair_ids, terms, good, bad = [], [], [], [], []
    seen: dict[tuple[str, str], int] = {}
    for number, fields in rows:
        try:
            if len(fields) != len(PREDICTION_COLUMNS) or not all(fields[:3]):
                raise ValueError
            probabilities = float(fields[3]), float(fields[4])
            if not all(0.0 <= value <= 1.0 for value in probabilities):
                raise ValueError
        except ValueError:
            raise UsageError(
                f"{path}:{number}: expected UID, pairID, linguistics_term, prob_good and prob_bad in [0, 1]"
            ) from None
        key = (fields[0], fields[1])
        if key in seen:
            raise UsageError(f"{path}:{number}: pair {fields[1]} of {fields[0]} is also on line {seen[key]}")
        seen[key] = number
        uids.append(fields[0])
        pair_ids.append(fields[1])
        terms.append(fields[2])
        good.append(probabilities[0])
        bad.append(probabilities[1])
    if not uids:
        raise UsageError(f"{path}: no rows")
    return BlimpPredictions(uids, pair_ids, terms, np.array(good), np.array(bad), path)


# --- the schema of blimp.json ---------------------------------------------------------------------------------
@dataclass
class PairScore:
    """Pair accuracy of a phenomenon (or of all pairs), with its 95% percentile bootstrap interval over pairs."""

    n: int
    pair_accuracy: float
    ci_low: float
    ci_high: float
    ties: int  # pairs whose two sentences got the same probability: counted wrong
    # Each of its 2n sentences judged alone at the decision threshold of BlimpAnalysis.sentences.
    sentence_accuracy: float


@dataclass
class ParadigmScore:
    n: int
    pair_accuracy: float
    linguistics_term: str  # as the data spells it (13 terms)
    phenomenon: str  # as the paper groups it (12)


@dataclass
class SentenceScore:
    """All sentences judged alone: acceptable when P(acceptable) > threshold; gold: good 1, bad 0."""

    n: int
    threshold: float
    threshold_chosen_on: str  # "validation" (the run's analysis.json) or "default"
    matthews_correlation: float
    accuracy: float
    predicted_acceptable: int
    mcc_at_half: float
    accuracy_at_half: float


@dataclass
class BlimpAnalysis(JsonRecord):
    """Everything in blimp.json; the reference figures are not stored here (see `load_reference`)."""

    run_dir: str
    overall: PairScore
    phenomena: dict[str, PairScore]
    paradigms: dict[str, ParadigmScore]
    sentences: SentenceScore
    bootstrap_resamples: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    charts: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION


# --- scores ---------------------------------------------------------------------------------------------------
def bootstrap_interval(
    right: int, n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95% percentile bootstrap interval of an accuracy of `right` out of `n` pairs (binomial draws, see above)."""
    draws = np.random.default_rng(seed).binomial(n, right / n, size=resamples) / n
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def _pair_score(predictions: BlimpPredictions, rows: np.ndarray, threshold: float) -> PairScore:
    right = int(predictions.correct[rows].sum())
    n = int(rows.sum())
    low, high = bootstrap_interval(right, n)
    judged_right = (predictions.prob_good[rows] > threshold).sum() + (predictions.prob_bad[rows] <= threshold).sum()
    return PairScore(
        n=n,
        pair_accuracy=right / n,
        ci_low=low,
        ci_high=high,
        ties=int((predictions.prob_good[rows] == predictions.prob_bad[rows]).sum()),
        sentence_accuracy=float(judged_right / (2 * n)),
    )


def sentence_score(predictions: BlimpPredictions, threshold: float, chosen_on: str) -> SentenceScore:
    probabilities = np.concatenate([predictions.prob_good, predictions.prob_bad])
    labels = np.concatenate([np.ones(len(predictions.uids), np.int8), np.zeros(len(predictions.uids), np.int8)])
    predicted = (probabilities > threshold).astype(np.int8)
    at_half = (probabilities > 0.5).astype(np.int8)
    return SentenceScore(
        n=len(labels),
        threshold=threshold,
        threshold_chosen_on=chosen_on,
        matthews_correlation=matthews_correlation(labels, predicted),
        accuracy=float((predicted == labels).mean()),
        predicted_acceptable=int(predicted.sum()),
        mcc_at_half=matthews_correlation(labels, at_half),
        accuracy_at_half=float((at_half == labels).mean()),
    )


def analyze_blimp(
    predictions: BlimpPredictions, threshold: float = 0.5, chosen_on: str = "default", run_dir: str = ""
) -> BlimpAnalysis:
    """blimp.json's figures from the pairs' predictions (nothing written)."""
    started = time.perf_counter()
    phenomena_of_rows = predictions.phenomena
    uids = np.array(predictions.uids)
    everything = np.ones(len(uids), bool)
    term_of = dict(zip(predictions.uids, predictions.terms, strict=True))
    paradigms = {}
    for uid in sorted(term_of, key=lambda uid: (phenomenon(term_of[uid]), uid)):
        rows = uids == uid
        paradigms[uid] = ParadigmScore(
            n=int(rows.sum()),
            pair_accuracy=float(predictions.correct[rows].mean()),
            linguistics_term=term_of[uid],
            phenomenon=phenomenon(term_of[uid]),
        )
    analysis = BlimpAnalysis(
        run_dir=run_dir,
        overall=_pair_score(predictions, everything, threshold),
        phenomena={
            name: _pair_score(predictions, phenomena_of_rows == name, threshold)
            for name in sorted(set(phenomena_of_rows.tolist()))
        },
        paradigms=paradigms,
        sentences=sentence_score(predictions, threshold, chosen_on),
        bootstrap_resamples=RESAMPLES,
    )
    if analysis.overall.ties:
        analysis.notes.append(
            f"{analysis.overall.ties} pair(s) got the same P(acceptable) for both sentences; counted wrong."
        )
    analysis.seconds = round(time.perf_counter() - started, 3)
    return analysis


OUTPUTS = (PREDICTIONS_FILE, BLIMP_JSON, BLIMP_MARKDOWN, BLIMP_CHART)


def remove_blimp_outputs(output_dir: str | Path) -> None:
    """An earlier run's BLiMP files, gone: a run without BLiMP must not look as if it had scored it."""
    for name in OUTPUTS:
        (Path(output_dir) / name).unlink(missing_ok=True)


def analyze_blimp_run(output_dir: str | Path, threshold: float | None = None) -> BlimpAnalysis:
    """Read the run's predictions_blimp.tsv; write blimp.json, blimp.md and blimp.png there; return the analysis.

    `threshold` is the run's decision threshold (chosen on its validation split); without one, 0.5.
    """
    output_dir = Path(output_dir)
    predictions = read_blimp_predictions(output_dir / PREDICTIONS_FILE)
    chosen_on = "default" if threshold is None else "validation"
    analysis = analyze_blimp(predictions, 0.5 if threshold is None else threshold, chosen_on, str(output_dir))
    reference = load_reference()
    missing = sorted(set(analysis.paradigms) - set(reference.paradigms))
    if missing:
        analysis.notes.append(f"No published figures for {len(missing)} paradigm(s): {', '.join(missing[:5])}.")
    plot_blimp(analysis, reference, output_dir / BLIMP_CHART)
    analysis.charts = [BLIMP_CHART]
    write_text(output_dir / BLIMP_JSON, analysis.to_json())
    write_text(output_dir / BLIMP_MARKDOWN, blimp_markdown(analysis, reference))
    logger.info(
        "BLiMP: pair accuracy %.3f [%.3f, %.3f] over %d pairs (GPT-2 %.3f, humans %.3f); written to %s",
        analysis.overall.pair_accuracy,
        analysis.overall.ci_low,
        analysis.overall.ci_high,
        analysis.overall.n,
        reference.overall["gpt2"],
        reference.overall["human"],
        output_dir / BLIMP_JSON,
    )
    return analysis


# --- the published figures ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """The authors' figures by key of REFERENCE_NAMES: per paradigm, per phenomenon (the paper's 12), overall."""

    paradigms: dict[str, dict[str, float]]
    phenomena: dict[str, dict[str, float]]
    overall: dict[str, float]
    citation: str = CITATION


@cache
def load_reference() -> Reference:
    """The figures shipped in cola_hf/analysis/blimp_reference/ (see its README.md for the source)."""
    folder = resources.files("cola_hf.analysis") / "blimp_reference"
    rows = [json.loads(line) for line in (folder / "models_summary.jsonl").read_text("utf-8").splitlines() if line]
    humans = {
        row["Condition"]: float(row["total_mean"])
        for row in csv.DictReader((folder / "human_validation_summary.csv").read_text("utf-8").splitlines())
    }
    models = [name for name in REFERENCE_NAMES if name != "human"]
    paradigms = {
        row["UID"]: {"phenomenon": row["linguistics_term"], **{name: row[name] for name in models}}
        for row in rows
        if row["UID"] != "overall"
    }
    for uid, figures in paradigms.items():
        figures["human"] = humans[uid]
    phenomena = {
        row["linguistics_term"]: {name: row[name] for name in models}
        for row in rows
        if row["UID"] == "overall" and row["linguistics_term"] != "overall"
    }
    for name, figures in phenomena.items():  # humans per phenomenon: the mean over its paradigms, as in the paper
        figures["human"] = float(np.mean([p["human"] for p in paradigms.values() if p["phenomenon"] == name]))
    overall = next(row for row in rows if row["linguistics_term"] == "overall")
    return Reference(
        paradigms=paradigms,
        phenomena=phenomena,
        overall={**{name: overall[name] for name in models}, "human": float(np.mean([humans[u] for u in paradigms]))},
    )


# --- for people: markdown, the chart, W&B tables --------------------------------------------------------------
def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def phenomena_frame(analysis: BlimpAnalysis, reference: Reference | None = None) -> pd.DataFrame:
    """One row per phenomenon, then `overall`: the model's pair accuracy and interval beside the published ones."""
    reference = reference or load_reference()
    rows = []
    for name, score in [*analysis.phenomena.items(), ("overall", analysis.overall)]:
        published = reference.overall if name == "overall" else reference.phenomena.get(name, {})
        rows.append(
            {"phenomenon": name, **dataclasses.asdict(score), **{key: published.get(key) for key in REFERENCE_NAMES}}
        )
    return pd.DataFrame(rows)


def paradigms_frame(analysis: BlimpAnalysis, reference: Reference | None = None) -> pd.DataFrame:
    """One row per paradigm: the model's pair accuracy, the published figures, and the model minus GPT-2."""
    reference = reference or load_reference()
    rows = []
    for uid, score in analysis.paradigms.items():
        published = reference.paradigms.get(uid, {})
        row = {"UID": uid, **dataclasses.asdict(score), **{key: published.get(key) for key in REFERENCE_NAMES}}
        row["minus_gpt2"] = None if row["gpt2"] is None else score.pair_accuracy - row["gpt2"]
        rows.append(row)
    return pd.DataFrame(rows)


def phenomena_markdown(analysis: BlimpAnalysis, reference: Reference | None = None) -> str:
    """The phenomenon table: model pair accuracy [95% CI] beside GPT-2, the LSTM, the 5-gram model and humans."""
    frame = phenomena_frame(analysis, reference)
    names = " | ".join(REFERENCE_NAMES[key] for key in SHOWN_REFERENCES)
    lines = [f"| phenomenon | pairs | model [95% CI] | {names} |", "|---|---:|---|" + "---:|" * len(SHOWN_REFERENCES)]
    for row in frame.itertuples(index=False):
        model = f"{row.pair_accuracy:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"
        cells = " | ".join(_number(_defined(getattr(row, key))) for key in SHOWN_REFERENCES)
        name = f"**{row.phenomenon}**" if row.phenomenon == "overall" else row.phenomenon
        lines.append(f"| {name} | {row.n} | {model} | {cells} |")
    return "\n".join(lines) + "\n"


def _defined(value: object) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def furthest_below_gpt2(analysis: BlimpAnalysis, count: int = FURTHEST_BELOW) -> pd.DataFrame:
    frame = paradigms_frame(analysis).dropna(subset=["minus_gpt2"])
    return frame.sort_values(["minus_gpt2", "UID"]).head(count)


def blimp_markdown(analysis: BlimpAnalysis, reference: Reference | None = None) -> str:
    reference = reference or load_reference()
    overall, sentences = analysis.overall, analysis.sentences
    at = "chosen on the validation split" if sentences.threshold_chosen_on == "validation" else "no threshold chosen"
    lines = [
        "# BLiMP: which sentence of each minimal pair the model prefers",
        "",
        f"Run: `{analysis.run_dir}`. {overall.n} pairs of BLiMP, each an acceptable and an unacceptable sentence that "
        "differ in one point of grammar. A pair is right when the model gives the acceptable one the higher "
        f"P(acceptable); chance is 0.5. Intervals: 95% percentile bootstrap over {analysis.bootstrap_resamples} "
        "resamples of the pairs. Published figures: language models' preference between the two sentences' "
        f"probabilities, and humans' agreement with the labels ({reference.citation}).",
        "",
        f"**Pair accuracy: {overall.pair_accuracy:.3f} [{overall.ci_low:.3f}, {overall.ci_high:.3f}]** "
        f"(GPT-2 {reference.overall['gpt2']:.3f}, LSTM {reference.overall['lstm']:.3f}, "
        f"5-gram {reference.overall['ngram']:.3f}, humans {reference.overall['human']:.3f}).",
        "",
        f"**Sentence by sentence** ({sentences.n} sentences, acceptable when P(acceptable) > "
        f"{sentences.threshold:.2f}, {at}): MCC {sentences.matthews_correlation:.3f}, accuracy "
        f"{sentences.accuracy:.3f}; predicted acceptable: {sentences.predicted_acceptable / sentences.n:.1%} (half "
        f"the sentences are). At 0.5: MCC "
        f"{sentences.mcc_at_half:.3f}, accuracy {sentences.accuracy_at_half:.3f}.",
        "",
        "## Phenomena",
        "",
        phenomena_markdown(analysis, reference),
        f"![BLiMP per phenomenon]({BLIMP_CHART})",
        "",
        "## Where the model is furthest below GPT-2",
        "",
        "| paradigm | phenomenon | model | GPT-2 | model - GPT-2 | human |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in furthest_below_gpt2(analysis).itertuples(index=False):
        lines.append(
            f"| {row.UID} | {row.phenomenon} | {row.pair_accuracy:.3f} | {row.gpt2:.3f} | {row.minus_gpt2:+.3f} | "
            f"{_number(_defined(row.human))} |"
        )
    lines += ["", "## Every paradigm", "", "| paradigm | phenomenon | pairs | model | GPT-2 | human |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for row in paradigms_frame(analysis, reference).itertuples(index=False):
        lines.append(
            f"| {row.UID} | {row.phenomenon} | {row.n} | {row.pair_accuracy:.3f} | {_number(_defined(row.gpt2))} | "
            f"{_number(_defined(row.human))} |"
        )
    if analysis.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in analysis.notes)]
    return "\n".join(lines) + "\n"


def summary_metrics(analysis: BlimpAnalysis) -> dict[str, float]:
    """The run's BLiMP figures for W&B's summary (runs side by side): overall, per phenomenon, sentence level."""
    return {
        "blimp/pair_accuracy": analysis.overall.pair_accuracy,
        **{f"blimp/{name}/pair_accuracy": score.pair_accuracy for name, score in analysis.phenomena.items()},
        "blimp/sentence_matthews_correlation": analysis.sentences.matthews_correlation,
        "blimp/sentence_accuracy": analysis.sentences.accuracy,
    }


def wandb_tables(analysis: BlimpAnalysis) -> dict[str, pd.DataFrame]:
    """Frames to log as `wandb.Table(dataframe=...)`: phenomena (with `overall`) and paradigms, references beside."""
    return {"blimp_phenomena": phenomena_frame(analysis), "blimp_paradigms": paradigms_frame(analysis)}


REFERENCE_STYLE = {  # marker, colour
    "gpt2": ("D", "tab:orange"),
    "lstm": ("s", "tab:green"),
    "ngram": ("v", "tab:gray"),
    "human": ("|", "black"),
}


def plot_blimp(analysis: BlimpAnalysis, reference: Reference, path: Path) -> None:
    """Pair accuracy per phenomenon (A to Z, then overall): the model with its interval, the published beside."""
    frame = phenomena_frame(analysis, reference).iloc[::-1]  # the first row at the top
    rows = np.arange(len(frame))
    figure, axes = pyplot().subplots(figsize=(9, 0.42 * len(frame) + 1.4))
    for key in SHOWN_REFERENCES:
        marker, color = REFERENCE_STYLE[key]
        size = 14 if marker == "|" else 6
        axes.plot(frame[key].astype(float), rows, marker, color=color, markersize=size, label=REFERENCE_NAMES[key])
    accuracy = frame["pair_accuracy"].to_numpy()
    error = [accuracy - frame["ci_low"].to_numpy(), frame["ci_high"].to_numpy() - accuracy]
    axes.errorbar(accuracy, rows, xerr=error, fmt="o", color="tab:blue", capsize=3, markersize=7, label="this model")
    axes.axvline(0.5, color="gray", linestyle="--", linewidth=0.8)
    axes.axhline(0.5, color="black", linewidth=0.6)  # overall (row 0) below the phenomena
    axes.set_yticks(rows, [f"{name} ({n} pairs)" for name, n in zip(frame["phenomenon"], frame["n"], strict=True)])
    axes.set(
        title="BLiMP pair accuracy per phenomenon, 95% bootstrap interval",
        xlabel="share of pairs whose acceptable sentence is preferred (chance 0.5, dashed)",
        xlim=(0, 1.02),
    )
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize="small", loc="lower left", ncol=5, bbox_to_anchor=(0, 1.06), frameon=False)
    save_figure(figure, path)


# --- two runs or two groups of seeds (cola-compare --blimp) ---------------------------------------------------
@dataclass
class PairedTest:
    """Run b against run a on the same pairs: exact McNemar test on which pairs each gets right."""

    test: str
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # b - a
    only_a_right: int
    only_b_right: int
    p_value: float


def aligned(a: BlimpPredictions, b: BlimpPredictions) -> tuple[BlimpPredictions, BlimpPredictions]:
    """b's rows in a's order; both must hold the same pairs."""
    if a.keys() == b.keys():
        return a, b
    position = {key: row for row, key in enumerate(b.keys())}
    only_one = set(position).symmetric_difference(a.keys())
    if only_one:
        uid, pair_id = min(only_one)
        raise UsageError(
            f"{b.path}: not the same pairs as {a.path} ({len(only_one)} in one only, e.g. pair {pair_id} of {uid})"
        )
    order = np.array([position[key] for key in a.keys()])
    return a, BlimpPredictions(a.uids, a.pair_ids, a.terms, b.prob_good[order], b.prob_bad[order], b.path)


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> PairedTest:
    """Exact McNemar: of the pairs the two runs disagree on, is b's share of them different from one half?"""
    from scipy import stats

    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(only_b, discordant, 0.5).pvalue)
    accuracy_a, accuracy_b = float(right_a.mean()), float(right_b.mean())
    return PairedTest(
        test="exact McNemar",
        n=len(right_a),
        accuracy_a=accuracy_a,
        accuracy_b=accuracy_b,
        difference=accuracy_b - accuracy_a,
        only_a_right=only_a,
        only_b_right=only_b,
        p_value=p_value,
    )


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment: p-values that control the chance of any false positive among the tests."""
    defined = [(p, index) for index, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(sorted(defined)):
        running = max(running, min(1.0, (len(defined) - rank) * p))
        adjusted[index] = running
    return adjusted


def compare_blimp(groups: Sequence[Sequence[Path]]) -> pd.DataFrame:
    """Group (or run) b against group a, per phenomenon and overall: McNemar for two runs, Welch for two groups.

    `groups` are two lists of run directories (a single run is a list of one). Columns: phenomenon, the test's
    fields, and `p_holm` (Holm's adjustment over the phenomena; the overall row is its own test).
    """
    if len(groups) != 2:
        raise UsageError("--blimp compares two runs, or two directories of seed runs")
    group_a, group_b = ([_read_run(run_dir) for run_dir in group] for group in groups)
    if (len(group_a) == 1) != (len(group_b) == 1):
        raise UsageError("--blimp: cannot test a single run against a group of seeds; give two runs or two groups")
    first = group_a[0]
    aligned_runs = [aligned(first, run)[1] for run in [*group_a, *group_b]]
    group_a, group_b = aligned_runs[: len(group_a)], aligned_runs[len(group_a) :]
    names = first.phenomena
    subsets = [(name, names == name) for name in sorted(set(names.tolist()))]
    subsets.append(("overall", np.ones(len(names), bool)))
    rows = []
    for name, rows_of in subsets:
        if len(group_a) == 1:
            result: PairedTest | SeedGroupTest = mcnemar(group_a[0].correct[rows_of], group_b[0].correct[rows_of])
        else:
            result = welch_test(
                [float(run.correct[rows_of].mean()) for run in group_a],
                [float(run.correct[rows_of].mean()) for run in group_b],
            )
        rows.append({"phenomenon": name, "pairs": int(rows_of.sum()), **dataclasses.asdict(result)})
    frame = pd.DataFrame(rows)
    frame["p_holm"] = holm([*frame["p_value"].iloc[:-1]]) + [frame["p_value"].iloc[-1]]
    return frame


def _read_run(run_dir: Path) -> BlimpPredictions:
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {PREDICTIONS_FILE} (a run without BLiMP: --blimp_source none, or offline)")
    return read_blimp_predictions(path)


def comparison_markdown(frame: pd.DataFrame, label_a: str, label_b: str) -> str:
    """The --blimp table: pair accuracy of a and b per phenomenon, b - a, the test and its p-values."""
    paired = "only_a_right" in frame.columns
    lines = [
        f"| phenomenon | pairs | {label_a} | {label_b} | b - a | "
        + ("a only / b only right | " if paired else "")
        + "p | p (Holm) |",
        "|---|---:|---:|---:|---:|" + ("---:|" if paired else "") + "---:|---:|",
    ]
    for row in frame.to_dict("records"):
        if paired:
            a, b = f"{row['accuracy_a']:.3f}", f"{row['accuracy_b']:.3f}"
            extra = f" {row['only_a_right']} / {row['only_b_right']} |"
        else:
            a = f"{row['mean_a']:.3f} ± {row['std_a']:.3f}"
            b = f"{row['mean_b']:.3f} ± {row['std_b']:.3f}"
            extra = ""
        name = f"**{row['phenomenon']}**" if row["phenomenon"] == "overall" else row["phenomenon"]
        lines.append(
            f"| {name} | {row['pairs']} | {a} | {b} | {row['difference']:+.3f} |{extra} "
            f"{_p(row['p_value'])} | {_p(row['p_holm'])} |"
        )
    test = (
        "exact McNemar test on the pairs the two runs disagree on"
        if paired
        else f"Welch's t-test on the seeds' pair accuracies ({int(frame['n_a'].iloc[0])} vs "
        f"{int(frame['n_b'].iloc[0])} seeds)"
    )
    return "\n".join(lines) + f"\n\nTest: {test}; p (Holm) adjusts for the {len(frame) - 1} phenomena.\n"


def _p(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"
