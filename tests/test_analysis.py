"""The analysis of a run's predictions: phenomena and sources against sklearn, threshold, calibration, significance.

The key test joins CoLA's grammatical annotations (COLA_ANNOTATIONS_ZIP) to seeded random predictions over the
real GLUE dev rows (COLA_ZIP) and recomputes every phenomenon with sklearn. The rest runs on small synthetic files.
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import logging
import shutil
import threading
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_rows
from scipy import stats
from sklearn.metrics import accuracy_score, confusion_matrix, matthews_corrcoef

from cola_hf.analysis.run_analysis import (
    RunAnalysis,
    SubsetScore,
    analyze_run,
    phenomena_markdown,
    wandb_tables,
)
from cola_hf.analysis.significance import paired_bootstrap, welch_test
from cola_hf.cli.compare import main as compare_main
from cola_hf.data.annotations import ANNOTATIONS_URL as DEFAULT_ANNOTATIONS_URL
from cola_hf.data.annotations import LEADING_COLUMNS, MAJOR_FEATURES, MAJOR_FILE, MINOR_FILE
from cola_hf.errors import UsageError
from cola_hf.predictions_tsv import read_predictions, write_predictions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_split(run_dir: Path, split: str, rows: dict, probabilities: np.ndarray) -> None:
    """predictions_<split>.tsv through the run's own writer; `rows` has sentence_source, label, sentence."""
    write_predictions(run_dir / f"predictions_{split}.tsv", rows, (probabilities > 0.5).astype(int), probabilities)


def random_probabilities(labels: list[int], seed: int) -> np.ndarray:
    """P(acceptable) that leans towards the label, so MCCs vary by subset rather than all being 0."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0.45 + 0.25 * np.array(labels), 0.2), 0.0, 1.0)


def columns(rows: list[tuple]) -> dict:
    return {"sentence_source": [r[0] for r in rows], "label": [r[1] for r in rows], "sentence": [r[3] for r in rows]}


def write_synthetic_run(run_dir: Path, glue_dev_rows: list[tuple], seed: int = 0, results: bool = True) -> Path:
    """A run directory with synthetic predictions for all four splits; glue_dev = in-domain then out-of-domain."""
    run_dir.mkdir(parents=True)
    half = len(glue_dev_rows) // 2
    validation = synthetic_rows(60, seed=21)
    probabilities = random_probabilities([row[1] for row in glue_dev_rows], seed)
    write_split(run_dir, "validation", columns(validation), random_probabilities([r[1] for r in validation], seed))
    write_split(run_dir, "in_domain_dev", columns(glue_dev_rows[:half]), probabilities[:half])
    write_split(run_dir, "out_of_domain_dev", columns(glue_dev_rows[half:]), probabilities[half:])
    write_split(run_dir, "glue_dev", columns(glue_dev_rows), probabilities)
    if results:  # what cola-compare's own table reads
        (run_dir / "results.json").write_text(json.dumps({"epochs": [], "test": {}, "config": {"seed": seed}}))
    return run_dir


def write_annotations(directory: Path, rows: list[tuple], features: dict[str, list[int]], header: str | None = None):
    """A major-features TSV in the annotation file's layout for `rows`; absent features are all 0."""
    directory.mkdir(parents=True, exist_ok=True)
    header = header or "\t".join([*LEADING_COLUMNS, *MAJOR_FEATURES])
    lines = [header]
    for index, (source, label, _, sentence) in enumerate(rows):
        domain = "In" if index < len(rows) // 2 else "Out"
        marks = [str(features.get(name, [0] * len(rows))[index]) for name in MAJOR_FEATURES]
        lines.append("\t".join([source, domain, str(label), sentence, *marks]))
    (directory / MAJOR_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


# --- the real GLUE dev set and the real annotations -----------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(cola_zip, tmp_path_factory) -> Path:
    """Seeded random predictions over the real validation split and test sets, written by the run's writer."""
    datasets.disable_progress_bars()
    from cola_hf.data.cola import read_cola, split_cola

    splits = split_cola(read_cola(str(cola_zip)), 0.1, 42)
    run_dir = tmp_path_factory.mktemp("real-run")
    for seed, split in enumerate(("validation", "out_of_domain_dev", "in_domain_dev")):
        write_split(run_dir, split, splits[split], random_probabilities(splits[split]["label"], seed))
    in_domain, out_of_domain = (
        read_predictions(run_dir / f"predictions_{s}.tsv") for s in ("in_domain_dev", "out_of_domain_dev")
    )
    write_split(
        run_dir, "glue_dev", splits["glue_dev"], np.concatenate([in_domain.probabilities, out_of_domain.probabilities])
    )
    return run_dir


def read_annotation_frame(annotations_zip: Path, name: str) -> pd.DataFrame:
    with zipfile.ZipFile(annotations_zip) as archive, archive.open(name) as handle:
        return pd.read_csv(handle, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype={"Sentence": str})


def assert_matches_sklearn(score: dict, labels: np.ndarray, predictions: np.ndarray) -> None:
    assert score["n"] == len(labels)
    assert score["n_acceptable"] == int(labels.sum())
    assert score["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    if len(set(labels)) < 2:
        assert score["matthews_correlation"] is None and "one class" in score["note"]
    else:
        assert score["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-12)
        assert score["mcc_ci_low"] <= score["mcc_ci_high"]


def test_every_phenomenon_matches_sklearn(real_run, annotations_zip, caplog):
    caplog.set_level(logging.INFO)
    analyze_run(real_run, str(annotations_zip), minor_features=True)

    saved = json.loads((real_run / "analysis.json").read_text())
    glue_dev = pd.read_csv(
        real_run / "predictions_glue_dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False
    )
    labels, predictions = glue_dev["label"].to_numpy(), glue_dev["prediction"].to_numpy()
    for file_name, key in ((MAJOR_FILE, "phenomena"), (MINOR_FILE, "minor_phenomena")):
        annotations = read_annotation_frame(annotations_zip, file_name)
        features = list(annotations.columns[len(LEADING_COLUMNS) :])
        assert list(saved[key]) == features
        assert len(features) == (15 if key == "phenomena" else 63)
        for name in features:
            marked = annotations[name].to_numpy() == 1
            assert_matches_sklearn(saved[key][name], labels[marked], predictions[marked])
    assert list(saved["phenomena"]) == list(MAJOR_FEATURES)
    # CoLA 1.1's labels are the ones scored, and the differences are said once.
    assert (annotations["Acceptability"].to_numpy() != labels).sum() == 2
    notes = [r.getMessage() for r in caplog.records if "differ from CoLA 1.1" in r.getMessage()]
    assert notes == ["The annotations differ from CoLA 1.1 in 4 sentence(s) (typo fixes) and 2 label(s); "
                     "CoLA 1.1's sentences and labels are used."]  # fmt: skip
    assert (real_run / "analysis.md").read_text().count("differ from CoLA 1.1") == 1


def test_test_sets_sources_and_calibration_match_sklearn(real_run, annotations_zip):
    analysis = analyze_run(real_run, str(annotations_zip))
    assert RunAnalysis.load(real_run / "analysis.json") == analysis  # the typed schema round-trips
    assert set(analysis.charts) == {"phenomena.png", "reliability.png", "confusion_matrix.png", "threshold.png"}
    for chart in analysis.charts:
        assert (real_run / chart).read_bytes().startswith(PNG_SIGNATURE)
    for split, test in analysis.test_sets.items():
        run = pd.read_csv(
            real_run / f"predictions_{split}.tsv", sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False
        )
        labels, predictions, probabilities = run["label"], run["prediction"], run["prob_acceptable"].to_numpy()
        assert_matches_sklearn(json.loads(json.dumps(test.score.__dict__)), labels.to_numpy(), predictions.to_numpy())
        assert test.confusion_matrix == confusion_matrix(labels, predictions, labels=[0, 1]).tolist()
        for source, group in run.groupby("sentence_source"):
            assert_matches_sklearn(
                test.sources[source].__dict__, group["label"].to_numpy(), group["prediction"].to_numpy()
            )
        assert sum(score.n for score in test.sources.values()) == len(run)
        bins = np.minimum((probabilities * 10).astype(int), 9)
        expected = sum(
            (bins == b).mean() * abs(probabilities[bins == b].mean() - labels[bins == b].mean())
            for b in range(10)
            if (bins == b).any()
        )
        assert test.expected_calibration_error == pytest.approx(expected, abs=1e-9)
        assert test.mcc_at_validation_threshold == pytest.approx(
            matthews_corrcoef(labels, probabilities > analysis.threshold.threshold), abs=1e-12
        )
    table = phenomena_markdown(analysis).splitlines()
    assert len(table) == 2 + 15 and table[2].startswith("| Simple | ")
    tables = wandb_tables(analysis)
    assert list(tables["phenomena"]["phenomenon"]) == list(MAJOR_FEATURES)
    assert set(tables["sources"]["split"]) == {"out_of_domain_dev", "in_domain_dev", "glue_dev"}


# --- synthetic files ------------------------------------------------------------------------------------------
@pytest.fixture
def glue_rows() -> list[tuple]:
    return synthetic_rows(40, seed=5)


def test_one_class_subset_has_no_mcc_and_one_predicted_class_says_so(tmp_path, glue_rows):
    run_dir = write_synthetic_run(tmp_path / "run", glue_rows)
    run = read_predictions(run_dir / "predictions_glue_dev.tsv")
    only_acceptable = [int(label == 1) for label in run.labels]
    predicted_acceptable = [int(p == 1) for p in run.predictions]
    annotations = write_annotations(
        tmp_path / "annotations", glue_rows, {"Imperative": only_acceptable, "Binding": predicted_acceptable}
    )

    analysis = analyze_run(run_dir, str(annotations))

    imperative = analysis.phenomena["Imperative"]
    assert imperative.matthews_correlation is None and imperative.note == "one class only: MCC undefined"
    assert imperative.accuracy == pytest.approx(run.predictions[run.labels == 1].mean())
    assert (
        json.loads((run_dir / "analysis.json").read_text())["phenomena"]["Imperative"]["matthews_correlation"] is None
    )
    binding = analysis.phenomena["Binding"]
    assert 0 < binding.n_acceptable < binding.n, "the fixture should mark both classes"
    assert binding.matthews_correlation == 0.0 and "predicts one class" in binding.note
    assert analysis.phenomena["Simple"] == SubsetScore(0, 0, None, None, note="no sentences")
    assert "| Imperative | " in phenomena_markdown(analysis) and "n/a (one class only" in phenomena_markdown(analysis)


def mismatch(rows: list[tuple], row: int, **changes) -> list[tuple]:
    changed = list(rows)
    source, label, notes, sentence = changed[row]
    changed[row] = (
        changes.get("source", source),
        changes.get("label", label),
        notes,
        changes.get("sentence", sentence),
    )
    return changed


WRONG_HEADER = "Source\tDomain\tLabel\tSentence"
BAD_ANNOTATIONS = {
    "sentence": (
        lambda rows: mismatch(rows, 6, sentence="A different sentence."),
        None,
        "{file}:8: sentence 'A different sentence.' differs from {preds} row 8",
    ),
    "label": (lambda rows: mismatch(rows, 3, label=1 - rows[3][1]), None, "{file}:5: label {label}, but {preds} row 5"),
    "source": (lambda rows: mismatch(rows, 0, source="xx99"), None, "{file}:2: source 'xx99', but {preds} row 2 has"),
    "rows": (lambda rows: rows[:-1], None, "{file}: 39 rows, but {preds} has 40"),
    "header": (
        lambda rows: rows,
        WRONG_HEADER,
        "{file}:1: wrong header; expected tab-separated Source, Domain, Acceptability, Sentence, then Simple, ",
    ),
}


@pytest.mark.parametrize(("change", "header", "message"), BAD_ANNOTATIONS.values(), ids=BAD_ANNOTATIONS.keys())
def test_bad_annotations_are_one_line_naming_file_and_row(tmp_path, glue_rows, change, header, message):
    run_dir = write_synthetic_run(tmp_path / "run", glue_rows)
    annotations = write_annotations(tmp_path / "annotations", change(glue_rows), {}, header)
    with pytest.raises(UsageError) as raised:
        analyze_run(run_dir, str(annotations))
    expected = message.format(
        file=annotations / MAJOR_FILE, preds=run_dir / "predictions_glue_dev.tsv", label=1 - glue_rows[3][1]
    )
    assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)
    assert not (run_dir / "analysis.json").exists()  # nothing half-done is left behind


def test_missing_annotation_file_and_missing_source_name_the_path(tmp_path, glue_rows):
    run_dir = write_synthetic_run(tmp_path / "run", glue_rows)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=f"^{tmp_path / 'empty'}: no {MAJOR_FILE} in it"):
        analyze_run(run_dir, str(tmp_path / "empty"))
    with pytest.raises(UsageError, match=r"no-such\.zip: no such file or directory \(--annotations_source\)$"):
        analyze_run(run_dir, str(tmp_path / "no-such.zip"))
    annotations = write_annotations(tmp_path / "annotations", glue_rows, {})
    with pytest.raises(UsageError, match=rf"^{annotations / MINOR_FILE}: cannot read \(No such file or directory\)"):
        analyze_run(run_dir, str(annotations), minor_features=True)


def test_offline_default_url_skips_phenomena_in_one_line(tmp_path, glue_rows, monkeypatch, caplog):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    caplog.set_level(logging.INFO)
    run_dir = write_synthetic_run(tmp_path / "run", glue_rows)

    analysis = analyze_run(run_dir, DEFAULT_ANNOTATIONS_URL, cache_dir=str(tmp_path / "cache"))

    assert analysis.phenomena == {} and analysis.annotations is None
    skipped = [r.getMessage() for r in caplog.records if "Phenomena skipped" in r.getMessage()]
    assert len(skipped) == 1 and "--annotations_source path/to/CoLA_grammatical_annotations.zip" in skipped[0]
    assert DEFAULT_ANNOTATIONS_URL in skipped[0]
    assert set(analysis.charts) == {"reliability.png", "confusion_matrix.png", "threshold.png"}
    assert "Skipped: no annotations at hand" in (run_dir / "analysis.md").read_text()
    assert json.loads((run_dir / "analysis.json").read_text())["phenomena"] == {}
    assert phenomena_markdown(analysis) == ""


def test_threshold_is_chosen_on_validation_only(tmp_path):
    """Validation separates at 0.70, the test sets at 0.30: the chosen threshold must be 0.70."""
    labels = [0] * 20 + [1] * 20
    rows = {"sentence_source": ["src"] * 40, "label": labels, "sentence": [f"sentence {i}." for i in range(40)]}
    validation = np.concatenate([np.linspace(0.05, 0.695, 20), np.linspace(0.705, 0.95, 20)])
    test = np.concatenate([np.linspace(0.02, 0.295, 20), np.linspace(0.305, 0.98, 20)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_split(run_dir, "validation", rows, validation)
    for split in ("in_domain_dev", "glue_dev"):
        write_split(run_dir, split, rows, test)

    analysis = analyze_run(run_dir, None)

    assert analysis.threshold.chosen_on == "validation"
    assert analysis.threshold.threshold == 0.70 and analysis.threshold.mcc_at_threshold == pytest.approx(1.0)
    assert analysis.threshold.mcc_at_half == pytest.approx(matthews_corrcoef(labels, validation > 0.5))
    glue_dev = analysis.test_sets["glue_dev"]
    assert glue_dev.mcc_at_validation_threshold == pytest.approx(matthews_corrcoef(labels, test > 0.70))
    assert glue_dev.mcc_at_validation_threshold < 1.0  # what choosing on the test set would have given
    assert glue_dev.score.matthews_correlation == pytest.approx(matthews_corrcoef(labels, test > 0.5))
    assert set(analysis.test_sets) == {"in_domain_dev", "glue_dev"}

    (run_dir / "predictions_validation.tsv").unlink()
    analysis = analyze_run(run_dir, None)
    assert analysis.threshold is None and analysis.test_sets["glue_dev"].mcc_at_validation_threshold is None
    assert "threshold.png" not in analysis.charts


def test_bad_predictions_file_is_one_line(tmp_path, glue_rows):
    run_dir = write_synthetic_run(tmp_path / "run", glue_rows)
    path = run_dir / "predictions_glue_dev.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], lines[3] + "\textra", *lines[4:]]) + "\n")
    with pytest.raises(UsageError, match=rf"^{path}:4: expected source, label 0/1, sentence, prediction 0/1"):
        analyze_run(run_dir, None)
    path.unlink()
    with pytest.raises(UsageError, match=rf"^{path}: cannot read \(No such file or directory\)$"):
        analyze_run(run_dir, None)


# --- significance ---------------------------------------------------------------------------------------------
def test_paired_bootstrap_of_a_run_with_itself_is_zero(real_run):
    run = read_predictions(real_run / "predictions_glue_dev.tsv")
    result = paired_bootstrap(run, run)
    assert (result.difference, result.ci_low, result.ci_high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_difference_interval_and_p(tmp_path, glue_rows):
    a = read_predictions(write_synthetic_run(tmp_path / "a", glue_rows, seed=1) / "predictions_glue_dev.tsv")
    better = a.labels.copy()  # run b: right everywhere
    b = read_predictions(write_synthetic_run(tmp_path / "b", glue_rows, seed=2) / "predictions_glue_dev.tsv")
    b.predictions = better
    result = paired_bootstrap(a, b, resamples=2000)
    expected = matthews_corrcoef(b.labels, b.predictions) - matthews_corrcoef(a.labels, a.predictions)
    assert result.difference == pytest.approx(expected) and result.mcc_b == pytest.approx(1.0)
    assert result.ci_low < result.difference < result.ci_high + 1e-12
    assert result.ci_low > 0 and result.p_value < 0.01
    c = read_predictions(write_synthetic_run(tmp_path / "c", synthetic_rows(40, seed=6)) / "predictions_glue_dev.tsv")
    with pytest.raises(UsageError, match="not the same sentence and label"):
        paired_bootstrap(a, c)


def test_welch_test_of_seed_groups():
    a, b = [0.50, 0.52, 0.51, 0.49], [0.56, 0.58, 0.57]
    result = welch_test(a, b)
    reference = stats.ttest_ind(b, a, equal_var=False)
    assert result.test == "Welch's t-test"
    assert result.difference == pytest.approx(np.mean(b) - np.mean(a))
    assert (result.statistic, result.p_value) == pytest.approx((reference.statistic, reference.pvalue))
    assert result.std_a == pytest.approx(np.std(a, ddof=1))
    same = welch_test(a, a)
    assert same.difference == 0.0 and same.p_value == pytest.approx(1.0)
    with pytest.raises(UsageError, match="at least 2 seeds per group"):
        welch_test([0.5], b)


# --- cola-compare ---------------------------------------------------------------------------------------------
@pytest.mark.lowest
def test_compare_phenomena_and_paired_significance(tmp_path, glue_rows, capsys):
    first = write_synthetic_run(tmp_path / "a", glue_rows, seed=1)
    second = write_synthetic_run(tmp_path / "b", glue_rows, seed=2)
    run = read_predictions(first / "predictions_glue_dev.tsv")
    annotations = write_annotations(tmp_path / "annotations", glue_rows, {"Binding": [1] * len(glue_rows)})
    analyze_run(second, str(annotations))  # one run with analysis.json, one without: both paths
    out = tmp_path / "comparison"

    assert compare_main([str(first), str(second), "--output", str(out), "--phenomena", "--significance",
                         "--annotations_source", str(annotations)]) == 0  # fmt: skip

    phenomena = (out / "phenomena.md").read_text().splitlines()
    assert phenomena[0] == "| phenomenon | n | a | b |"
    binding = next(line for line in phenomena if line.startswith("| Binding |"))
    mcc_a = matthews_corrcoef(run.labels, run.predictions)
    assert binding.startswith(f"| Binding | {len(glue_rows)} | {mcc_a:.3f} [")
    per_run = pd.read_csv(out / "phenomena.csv")
    assert set(per_run["group"]) == {"a", "b"} and len(per_run) == 2 * 15
    significance = (out / "significance.md").read_text().splitlines()
    b = read_predictions(second / "predictions_glue_dev.tsv")
    difference = matthews_corrcoef(b.labels, b.predictions) - mcc_a
    assert significance[2].startswith(f"| a | b | paired bootstrap, 10000 resamples of {len(glue_rows)} sentences | ")
    assert f"| {difference:+.3f} | [" in significance[2]
    assert "Significance on glue_dev (against a)" in capsys.readouterr().out


@pytest.mark.lowest
def test_compare_groups_of_seeds_use_welch(tmp_path, glue_rows, capsys):
    for group, seeds in (("recipe-a", (1, 2, 3)), ("recipe-b", (4, 5))):
        for seed in seeds:
            write_synthetic_run(tmp_path / group / f"seed-{seed}", glue_rows, seed=seed)
    annotations = write_annotations(tmp_path / "annotations", glue_rows, {"Binding": [1] * len(glue_rows)})
    out = tmp_path / "comparison"
    argv = [str(tmp_path / "recipe-a"), str(tmp_path / "recipe-b"), "--output", str(out), "--annotations_source"]

    assert compare_main([*argv, str(annotations), "--phenomena", "--significance"]) == 0

    assert len(pd.read_csv(out / "comparison.csv")) == 5  # every seed's row in the usual table
    mccs = {
        group: [matthews_corrcoef(r.labels, r.predictions) for r in
                (read_predictions(d / "predictions_glue_dev.tsv") for d in sorted((tmp_path / group).iterdir()))]
        for group in ("recipe-a", "recipe-b")
    }  # fmt: skip
    binding = next(line for line in (out / "phenomena.md").read_text().splitlines() if line.startswith("| Binding"))
    mean, std = np.mean(mccs["recipe-a"]), np.std(mccs["recipe-a"], ddof=1)
    assert binding.startswith(f"| Binding | {len(glue_rows)} | {mean:.3f} ± {std:.3f} (3 seeds) | ")
    p_value = stats.ttest_ind(mccs["recipe-b"], mccs["recipe-a"], equal_var=False).pvalue
    row = (out / "significance.md").read_text().splitlines()[2]
    assert row.startswith("| recipe-a | recipe-b | Welch's t-test, 3 vs 2 seeds | ") and row.endswith(
        f"| {p_value:.4f} |"
    )

    capsys.readouterr()
    mixed = [str(tmp_path / "recipe-a"), str(tmp_path / "recipe-b" / "seed-4"), "--output", str(out), "--significance"]
    assert compare_main(mixed) == 2
    assert capsys.readouterr().err == (
        "cola-compare: error: seed-4: cannot test a single run against a group of seeds; "
        "give two runs or two seed directories\n"
    )


def test_compare_without_annotations_names_the_run(tmp_path, glue_rows, monkeypatch, capsys):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    run_dir = write_synthetic_run(tmp_path / "a", glue_rows)
    shutil.copytree(run_dir, tmp_path / "b")
    assert compare_main([str(run_dir), str(tmp_path / "b"), "--output", str(tmp_path / "out"), "--phenomena"]) == 2
    assert capsys.readouterr().err.startswith(f"cola-compare: error: {run_dir}: no phenomena in analysis.json")


@pytest.fixture
def served_dir(tmp_path):
    """A directory served over HTTP on localhost, like the CoLA site, until the test ends."""
    directory = tmp_path / "site"
    directory.mkdir()
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield directory, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test's output is not the place for an access log
        pass


def test_annotations_url_is_downloaded_once_then_served_offline(tmp_path, glue_rows, served_dir, monkeypatch):
    site, url = served_dir
    annotations = write_annotations(tmp_path / "annotations", glue_rows, {"Binding": [1] * len(glue_rows)})
    with zipfile.ZipFile(site / "CoLA_grammatical_annotations.zip", "w") as archive:
        archive.write(annotations / MAJOR_FILE, MAJOR_FILE)
    run_dir = write_synthetic_run(tmp_path / "run", glue_rows)
    source, cache = f"{url}/CoLA_grammatical_annotations.zip", str(tmp_path / "cache")

    online = analyze_run(run_dir, source, cache_dir=cache)
    (site / "CoLA_grammatical_annotations.zip").unlink()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    offline = analyze_run(run_dir, source, cache_dir=cache)

    assert online.phenomena["Binding"].n == offline.phenomena["Binding"].n == len(glue_rows)
    assert offline.phenomena == online.phenomena and offline.annotations.source == source
