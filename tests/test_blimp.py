"""BLiMP: reading and checking the pairs, scoring their sentences, blimp.json against predictions_blimp.tsv
recomputed independently, the paired tests, and the bad inputs that must stop with one line.

Synthetic BLiMP files are built here (real paradigm names, made-up sentences); the real release is read only
where BLIMP_ZIP points at it. No BLiMP sentence is in the repository.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BLIMP_PAIRS as PAIRS
from conftest import BLIMP_PARADIGMS as PARADIGMS
from conftest import paradigm_lines, write_blimp_dir
from launching import REPO, offline_env, run_cola
from scipy import stats
from sklearn.metrics import matthews_corrcoef

from cola_hf.analysis import blimp_report as analysis
from cola_hf.config import parse_args
from cola_hf.data import blimp_pairs as blimp
from cola_hf.data.sources import BLIMP_URL
from cola_hf.errors import UsageError
from cola_hf.training.inference import acceptable_probabilities


def zip_dir(directory: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(directory.rglob("*")):
            archive.write(file, file.relative_to(directory))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets-cache"))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


# --- reading ------------------------------------------------------------------------------------------------
def test_a_directory_and_its_zip_read_alike_without_the_macos_litter(blimp_dir, tmp_path, cache_dir):
    from_dir = blimp.read_blimp(str(blimp_dir), cache_dir)
    from_zip = blimp.read_blimp(str(zip_dir(blimp_dir, tmp_path / "BLiMP.zip")), cache_dir)
    assert from_dir.to_list() == from_zip.to_list()
    assert len(from_dir) == len(PARADIGMS) * PAIRS
    assert from_dir.unique("UID") == sorted(PARADIGMS)  # by UID, pairs in file order
    assert from_dir["pairID"][:3] == ["0", "1", "2"]
    # The data's terms as they are (s-selection stays); one spelling of syntax_semantics.
    assert sorted(from_dir.unique("linguistics_term")) == sorted({term for term, _ in PARADIGMS.values()})
    assert sorted(from_dir.unique("field")) == ["morphology", "syntax", "syntax_semantics"]
    first = json.loads(paradigm_lines("anaphor_gender_agreement")[0])
    assert from_dir[0]["sentence_good"] == first["sentence_good"]
    assert from_dir[0]["sentence_bad"] == first["sentence_bad"]


def test_pairs_are_cached_by_content_not_by_path(blimp_dir, tmp_path, cache_dir):
    first = blimp.read_blimp(str(blimp_dir), cache_dir)
    copy = write_blimp_dir(tmp_path / "copy")  # the same contents elsewhere
    assert blimp.read_blimp(str(copy), cache_dir).cache_files == first.cache_files
    changed = paradigm_lines("causative")
    changed[0] = changed[0].replace('"pairID": "0"', '"pairID": "first"')
    (copy / "data" / "causative.jsonl").write_text("\n".join(changed) + "\n", encoding="utf-8")
    reread = blimp.read_blimp(str(copy), cache_dir)
    assert reread.cache_files != first.cache_files
    assert "first" in reread["pairID"]


def test_none_skips_blimp(cache_dir):
    assert blimp.read_blimp("none", cache_dir) is None
    assert blimp.check_blimp("None", cache_dir) is None
    assert blimp.read_blimp(None, cache_dir) is None


def test_the_url_offline_skips_blimp_with_one_line_saying_how_to_point_at_a_copy(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with caplog.at_level("WARNING", logger="cola_hf.data.blimp_pairs"):
        assert blimp.read_blimp(BLIMP_URL, str(tmp_path / "empty-cache")) is None
    (record,) = caplog.records
    assert blimp.HOW_TO_PROVIDE in record.getMessage() and "\n" not in record.getMessage()


def bad_line(uid: str, line: int, replacement: str) -> dict[str, list[str]]:
    lines = {name: paradigm_lines(name) for name in PARADIGMS}
    lines[uid][line - 1] = replacement
    return lines


def without(record: str, *fields: str) -> str:
    values = json.loads(record)
    return json.dumps({key: value for key, value in values.items() if key not in fields})


def emptied(record: str) -> str:
    return json.dumps({**json.loads(record), "sentence_bad": " "})


BAD_SOURCES = {
    "broken JSON line": (
        lambda root: write_blimp_dir(root, bad_line("causative", 3, '{"sentence_good": "A cat saw it.", ')),
        "data/causative.jsonl:3: not valid JSON",
    ),
    "missing fields": (
        lambda root: write_blimp_dir(
            root, bad_line("wh_island", 5, without(paradigm_lines("wh_island")[4], "sentence_bad", "UID"))
        ),
        "data/wh_island.jsonl:5: missing field(s) sentence_bad, UID",
    ),
    "empty sentence": (
        lambda root: write_blimp_dir(root, bad_line("wh_island", 2, emptied(paradigm_lines("wh_island")[1]))),
        "data/wh_island.jsonl:2: sentence_bad must be a non-empty string",
    ),
    "not an object": (
        lambda root: write_blimp_dir(root, bad_line("causative", 1, '["a", "list"]')),
        "data/causative.jsonl:1: expected a JSON object, found list",
    ),
    "two paradigms in one file": (
        lambda root: write_blimp_dir(
            root, bad_line("causative", 4, paradigm_lines("causative")[3].replace('"causative"', '"other"'))
        ),
        "data/causative.jsonl:4: UID 'other', but line 1 has 'causative'",
    ),
    "a pairID twice": (
        lambda root: write_blimp_dir(root, bad_line("causative", 7, paradigm_lines("causative")[1])),
        "data/causative.jsonl:7: pairID 1 is also on line 2",
    ),
    "an empty paradigm": (
        lambda root: write_blimp_dir(root, {**{u: paradigm_lines(u) for u in PARADIGMS}, "causative": [""]}),
        "data/causative.jsonl: no pairs",
    ),
    "a zip without BLiMP's files": (
        lambda root: zip_dir(_readme_only(root / "unzipped"), root / "not-blimp.zip"),
        "not-blimp.zip: no BLiMP paradigm files (data/<UID>.jsonl) in it (--blimp_source)",
    ),
    "a file that is not a zip": (
        lambda root: _written(root / "BLiMP.zip", "not a zip"),
        "BLiMP.zip: not a zip file",
    ),
    "no such path": (lambda root: root / "nowhere" / "BLiMP.zip", "BLiMP.zip: no such file or directory"),
}


def _readme_only(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "README.md").write_text("no paradigms here\n")
    return directory


def _written(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_a_bad_source_stops_with_one_line_naming_the_file_and_line(case, tmp_path, cache_dir):
    make, expected = BAD_SOURCES[case]
    source = str(make(tmp_path))
    for reader in (blimp.check_blimp, blimp.read_blimp):  # the check before training, and the read after
        with pytest.raises(blimp.BlimpDataError) as caught:
            reader(source, cache_dir)
        message = str(caught.value)
        assert expected in message and "\n" not in message, message
        assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2


@pytest.mark.parametrize("source", ["s3://bucket/BLiMP.zip", "hf://datasets/blimp"])
def test_an_unknown_kind_of_source_is_named(source, cache_dir):
    with pytest.raises(blimp.BlimpDataError, match=r"unknown --blimp_source; expected .*or none"):
        blimp.check_blimp(source, cache_dir)


# --- tokenizing and scoring -----------------------------------------------------------------------------------
def test_each_pair_becomes_its_two_sentences_tokenized_once(blimp_dir, cache_dir, tiny):
    _model, tokenizer = tiny
    pairs = blimp.read_blimp(str(blimp_dir), cache_dir)
    sentences = blimp.tokenize_blimp(pairs, tokenizer, max_seq_length=8)
    assert len(sentences) == 2 * len(pairs)
    assert sentences["pair"] == [row // 2 for row in range(len(sentences))]
    assert sentences["label"] == [1, 0] * len(pairs)
    for row in (0, 1, len(sentences) - 1):
        pair = pairs[row // 2]
        text = pair["sentence_good"] if row % 2 == 0 else pair["sentence_bad"]
        expected = tokenizer(text, truncation=True, max_length=8)["input_ids"]
        assert sentences[row]["input_ids"] == expected
    assert sentences["length"] == [len(ids) for ids in sentences["input_ids"]]
    assert max(sentences["length"]) == 8  # truncated at max_seq_length
    again = blimp.tokenize_blimp(blimp.read_blimp(str(blimp_dir), cache_dir), tokenizer, max_seq_length=8)
    assert again.cache_files == sentences.cache_files and sentences.cache_files  # from datasets' cache


def one_by_one(model, ids_list: list[list[int]]) -> np.ndarray:
    """The plain way: each sentence alone, no padding at all."""
    with torch.no_grad():
        return np.array(
            [torch.softmax(model(input_ids=torch.tensor([ids])).logits.double(), -1)[0, 1].item() for ids in ids_list]
        )


@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_scores_are_each_sentence_alone_in_the_input_order(blimp_dir, cache_dir, tiny, batch_size):
    model, tokenizer = tiny
    sentences = blimp.tokenize_blimp(blimp.read_blimp(str(blimp_dir), cache_dir), tokenizer)
    expected = one_by_one(model, sentences["input_ids"])
    assert len(set(sentences["length"])) > 3  # batches mix lengths, so padding and order are exercised
    scores = acceptable_probabilities(model, sentences, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    assert scores.dtype == np.float64 and scores.shape == (len(sentences),)
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    # A selection (rows out of order), and plain lists of ids, give the same as those rows alone.
    rows = [9, 3, 40, 3, 0]
    picked = acceptable_probabilities(model, sentences.select(rows), batch_size=batch_size, progress=False)
    np.testing.assert_allclose(picked, expected[rows], atol=1e-6)
    lists = acceptable_probabilities(model, [sentences[r]["input_ids"] for r in rows], batch_size=batch_size)
    np.testing.assert_allclose(lists, expected[rows], atol=1e-6)


def test_scoring_leaves_the_model_as_it_was_and_reads_the_acceptable_label(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    input_ids = tokenizer(["the cat saw the book.", "book the saw cat the.", "she liked it."])["input_ids"]
    model.train()
    scores = acceptable_probabilities(model, input_ids, progress=False)
    assert model.training
    swapped = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, id2label={0: "acceptable", 1: "unacceptable"}, label2id={"acceptable": 0, "unacceptable": 1}
    )
    np.testing.assert_allclose(acceptable_probabilities(swapped, input_ids, progress=False), 1 - scores, atol=1e-9)
    assert acceptable_probabilities(model, [], progress=False).shape == (0,)


# --- predictions_blimp.tsv and blimp.json ---------------------------------------------------------------------
def synthetic_predictions(seed: int = 0, pairs: int = PAIRS) -> analysis.BlimpPredictions:
    rng = np.random.default_rng(seed)
    uids = [uid for uid in PARADIGMS for _ in range(pairs)]
    good = rng.beta(2, 1.5, len(uids))
    bad = rng.beta(1.5, 2, len(uids))
    bad[5] = good[5]  # one tie
    return analysis.BlimpPredictions(
        uids=uids,
        pair_ids=[str(i % pairs) for i in range(len(uids))],
        terms=[PARADIGMS[uid][0] for uid in uids],
        prob_good=good,
        prob_bad=bad,
    )


def write_run(directory: Path, predictions: analysis.BlimpPredictions, threshold: float | None = 0.42) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    analysis.write_blimp_predictions(directory / analysis.PREDICTIONS_FILE, predictions)
    analysis.analyze_blimp_run(directory, threshold)
    return directory


def test_the_predictions_file_reads_back_exactly(tmp_path):
    predictions = synthetic_predictions()
    predictions.prob_good[0] = 1 - 1e-15  # two confident sentences stay apart
    predictions.prob_bad[0] = 1 - 2e-15
    path = tmp_path / analysis.PREDICTIONS_FILE
    analysis.write_blimp_predictions(path, predictions)
    back = analysis.read_blimp_predictions(path)
    assert back.keys() == predictions.keys() and back.terms == predictions.terms
    assert np.array_equal(back.prob_good, predictions.prob_good)
    assert np.array_equal(back.prob_bad, predictions.prob_bad)
    assert path.read_text().split("\n", 1)[0] == "UID\tpairID\tlinguistics_term\tprob_good\tprob_bad"


def test_blimp_json_matches_pair_accuracy_recomputed_from_the_tsv(tmp_path):
    run = write_run(tmp_path / "run", synthetic_predictions())
    saved = json.loads((run / analysis.BLIMP_JSON).read_text())
    # Independently: the csv module, strict ">" per pair, the paper's grouping of s-selection.
    right = defaultdict(list)
    paradigm_term = {}
    sentences = []  # (gold, probability)
    with (run / analysis.PREDICTIONS_FILE).open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            good, bad = float(row["prob_good"]), float(row["prob_bad"])
            term = row["linguistics_term"]
            group = "argument_structure" if term == "s-selection" else term
            right[("paradigm", row["UID"])].append(good > bad)
            right[("phenomenon", group)].append(good > bad)
            right[("overall", "")].append(good > bad)
            paradigm_term[row["UID"]] = term
            sentences += [(1, good), (0, bad)]
    paradigms = {uid: values for (kind, uid), values in right.items() if kind == "paradigm"}
    phenomena = {name: values for (kind, name), values in right.items() if kind == "phenomenon"}
    assert set(saved["paradigms"]) == set(paradigms) and set(saved["phenomena"]) == set(phenomena)
    assert "s-selection" not in saved["phenomena"]
    for uid, values in paradigms.items():
        entry = saved["paradigms"][uid]
        assert entry["n"] == len(values) and entry["linguistics_term"] == paradigm_term[uid]
        assert entry["pair_accuracy"] == pytest.approx(sum(values) / len(values), abs=1e-12)
    for name, values in phenomena.items():
        entry = saved["phenomena"][name]
        assert entry["n"] == len(values)
        assert entry["pair_accuracy"] == pytest.approx(sum(values) / len(values), abs=1e-12)
        assert entry["ci_low"] <= entry["pair_accuracy"] <= entry["ci_high"]
    overall = right[("overall", "")]
    assert saved["overall"]["pair_accuracy"] == pytest.approx(sum(overall) / len(overall), abs=1e-12)
    assert saved["overall"]["ties"] == 1 and any("counted wrong" in note for note in saved["notes"])
    # The sentence level: each sentence alone at the run's threshold, against sklearn.
    gold = [label for label, _ in sentences]
    at_threshold = [int(p > 0.42) for _, p in sentences]
    assert saved["sentences"]["n"] == 2 * len(overall)
    assert saved["sentences"]["threshold"] == 0.42 and saved["sentences"]["threshold_chosen_on"] == "validation"
    assert saved["sentences"]["matthews_correlation"] == pytest.approx(matthews_corrcoef(gold, at_threshold))
    assert saved["sentences"]["accuracy"] == pytest.approx(np.mean(np.equal(gold, at_threshold)))
    assert saved["sentences"]["mcc_at_half"] == pytest.approx(
        matthews_corrcoef(gold, [int(p > 0.5) for _, p in sentences])
    )
    # Typed both ways.
    assert analysis.BlimpAnalysis.load(run / analysis.BLIMP_JSON) == analysis.BlimpAnalysis.from_json(
        analysis.BlimpAnalysis.load(run / analysis.BLIMP_JSON).to_json()
    )


def test_without_a_threshold_the_sentences_are_judged_at_one_half(tmp_path):
    run = write_run(tmp_path / "run", synthetic_predictions(), threshold=None)
    sentences = analysis.BlimpAnalysis.load(run / analysis.BLIMP_JSON).sentences
    assert (sentences.threshold, sentences.threshold_chosen_on) == (0.5, "default")
    assert sentences.matthews_correlation == sentences.mcc_at_half


def test_blimp_md_and_the_chart_put_the_published_figures_beside(tmp_path):
    run = write_run(tmp_path / "run", synthetic_predictions())
    result = analysis.BlimpAnalysis.load(run / analysis.BLIMP_JSON)
    markdown = (run / analysis.BLIMP_MARKDOWN).read_text()
    assert "| phenomenon | pairs | model [95% CI] | GPT-2 | LSTM | 5-gram | human |" in markdown
    assert "| **overall** | 150 |" in markdown and "GPT-2 0.830" in markdown and "humans 0.886" in markdown
    # argument_structure holds causative and the s-selection paradigm; its GPT-2 figure is the paper's.
    assert "| argument_structure | 60 |" in markdown and "| 0.818 |" in markdown
    below = analysis.furthest_below_gpt2(result)
    assert list(below["minus_gpt2"]) == sorted(below["minus_gpt2"])
    assert "made_up_paradigm" not in set(below["UID"])  # no published figure to be below
    assert any("made_up_paradigm" in note for note in result.notes)
    assert analysis.phenomena_markdown(result) in markdown  # the model card's table
    assert (run / analysis.BLIMP_CHART).stat().st_size > 10_000 and result.charts == [analysis.BLIMP_CHART]
    tables = analysis.wandb_tables(result)
    assert list(tables["blimp_phenomena"]["phenomenon"])[-1] == "overall"
    assert len(tables["blimp_paradigms"]) == len(PARADIGMS)


def test_the_binomial_bootstrap_is_the_pair_bootstrap():
    """Resampling n right/wrong pairs counts Binomial(n, p) right ones: the same interval as resampling rows."""
    right = np.zeros(1000, bool)
    right[:730] = True
    rng = np.random.default_rng(1)
    resampled = right[rng.integers(0, len(right), (4000, len(right)))].mean(axis=1)
    low, high = analysis.bootstrap_interval(730, 1000, resamples=4000)
    assert low == pytest.approx(np.percentile(resampled, 2.5), abs=0.004)
    assert high == pytest.approx(np.percentile(resampled, 97.5), abs=0.004)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("causative\t0\targument_structure\t0.5", "expected UID, pairID"),
        ("causative\t0\targument_structure\t0.5\t1.5", "prob_bad in [0, 1]"),
        ("causative\t0\targument_structure\tabc\t0.5", "expected UID"),
        ("\t0\targument_structure\t0.5\t0.5", "expected UID"),
        ("causative\t1\targument_structure\t0.5\t0.4", "pair 1 of causative is also on line 2"),
    ],
)
def test_a_bad_predictions_row_is_named(tmp_path, line, problem):
    path = tmp_path / analysis.PREDICTIONS_FILE
    path.write_text(f"{chr(9).join(analysis.PREDICTION_COLUMNS)}\ncausative\t1\targument_structure\t0.6\t0.3\n{line}\n")
    with pytest.raises(UsageError, match=rf"{path.name}:3: .*{re.escape(problem)}"):
        analysis.read_blimp_predictions(path)


# --- two runs, two groups of seeds ----------------------------------------------------------------------------
def test_mcnemar_is_the_exact_binomial_test_on_the_disagreements():
    right_a = np.array([True] * 30 + [False] * 50 + [True] * 100 + [False] * 20)
    right_b = np.array([False] * 30 + [True] * 50 + [True] * 100 + [False] * 20)
    result = analysis.mcnemar(right_a, right_b)
    assert (result.only_a_right, result.only_b_right, result.n) == (30, 50, 200)
    # Two-sided exact p: twice the binomial tail of the smaller count, by hand.
    by_hand = min(1.0, 2 * sum(math.comb(80, k) for k in range(31)) / 2**80)
    assert result.p_value == pytest.approx(by_hand, rel=1e-9)
    assert result.difference == pytest.approx((150 - 130) / 200)
    same = analysis.mcnemar(right_a, right_a)
    assert same.p_value == 1.0 and same.difference == 0


def test_two_runs_are_compared_pair_by_pair_in_any_row_order(tmp_path):
    a = write_run(tmp_path / "a", synthetic_predictions(seed=0))
    predictions_b = synthetic_predictions(seed=1)
    order = np.random.default_rng(0).permutation(len(predictions_b.uids))  # b's file in another order
    shuffled = analysis.BlimpPredictions(
        [predictions_b.uids[i] for i in order],
        [predictions_b.pair_ids[i] for i in order],
        [predictions_b.terms[i] for i in order],
        predictions_b.prob_good[order],
        predictions_b.prob_bad[order],
    )
    b = write_run(tmp_path / "b", shuffled)
    frame = analysis.compare_blimp([[a], [b]])
    assert list(frame["phenomenon"]) == ["anaphor_agreement", "argument_structure", "island_effects", "overall"]
    overall = frame.iloc[-1]
    right_a, right_b = synthetic_predictions(seed=0).correct, predictions_b.correct
    assert overall["only_a_right"] == np.sum(right_a & ~right_b)
    assert overall["only_b_right"] == np.sum(~right_a & right_b)
    assert overall["accuracy_b"] == pytest.approx(right_b.mean())
    assert all(frame["p_holm"].iloc[:-1] >= frame["p_value"].iloc[:-1] - 1e-15)
    markdown = analysis.comparison_markdown(frame, "a", "b")
    assert "exact McNemar" in markdown and "| **overall** | 150 |" in markdown


def test_two_groups_of_seeds_are_compared_by_welch_over_their_seeds(tmp_path):
    group_a = [write_run(tmp_path / "a" / f"seed-{s}", synthetic_predictions(seed=s)) for s in range(3)]
    group_b = [write_run(tmp_path / "b" / f"seed-{s}", synthetic_predictions(seed=10 + s)) for s in range(3)]
    frame = analysis.compare_blimp([group_a, group_b])
    accuracies_a = [synthetic_predictions(seed=s).correct.mean() for s in range(3)]
    accuracies_b = [synthetic_predictions(seed=10 + s).correct.mean() for s in range(3)]
    overall = frame.iloc[-1]
    assert overall["p_value"] == pytest.approx(stats.ttest_ind(accuracies_b, accuracies_a, equal_var=False).pvalue)
    assert overall["mean_b"] - overall["mean_a"] == pytest.approx(np.mean(accuracies_b) - np.mean(accuracies_a))
    assert "Welch" in analysis.comparison_markdown(frame, "a", "b")
    with pytest.raises(UsageError, match="single run against a group"):
        analysis.compare_blimp([group_a[:1], group_b])


def test_runs_over_different_pairs_are_not_compared(tmp_path):
    a = write_run(tmp_path / "a", synthetic_predictions())
    b = write_run(tmp_path / "b", synthetic_predictions(pairs=PAIRS - 1))
    with pytest.raises(UsageError, match=r"not the same pairs .*5 in one only"):
        analysis.compare_blimp([[a], [b]])
    (tmp_path / "c").mkdir()
    with pytest.raises(UsageError, match="no predictions_blimp.tsv"):
        analysis.compare_blimp([[a], [tmp_path / "c"]])


def test_holm_adjusts_step_down():
    assert analysis.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])


# --- the real release and the published figures ---------------------------------------------------------------
def test_the_published_figures_shipped_with_the_package():
    reference = analysis.load_reference()
    assert len(reference.paradigms) == 67 and len(reference.phenomena) == 12
    assert reference.overall["gpt2"] == pytest.approx(0.830, abs=5e-4)
    assert reference.overall["human"] == pytest.approx(0.886, abs=5e-4)  # the paper's 88.6
    assert reference.phenomena["anaphor_agreement"]["human"] == pytest.approx(0.975)


def test_the_real_release_reads_as_the_paper_describes_it(blimp_zip, cache_dir):
    pairs = blimp.read_blimp(str(blimp_zip), cache_dir)
    assert len(pairs) == 67_000
    uids = pairs.unique("UID")
    assert len(uids) == 67 and all(count == 1000 for count in np.unique(pairs["UID"], return_counts=True)[1])
    assert len(pairs.unique("linguistics_term")) == 13
    assert sorted(pairs.unique("field")) == ["morphology", "semantics", "syntax", "syntax_semantics"]
    # Grouped as the paper groups them, every paradigm is where the published summary puts it.
    reference = analysis.load_reference()
    term_of = dict(zip(pairs["UID"], pairs["linguistics_term"], strict=True))
    assert {uid: analysis.phenomenon(term) for uid, term in term_of.items()} == {
        uid: figures["phenomenon"] for uid, figures in reference.paradigms.items()
    }


# --- the benchmark --------------------------------------------------------------------------------------------
def test_the_speed_benchmark_runs_both_ways_and_they_agree(blimp_dir, tiny_model_dir, tmp_path):
    output = tmp_path / "blimp_speed.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "blimp_speed.py"),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--blimp_source",
            str(blimp_dir),
            "--limit",
            "40",
            "--batch_size",
            "16",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        env=offline_env({"HF_DATASETS_CACHE": str(tmp_path / "cache")}),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["sentences"] == 80
    for method in ("cola_hf", "pipeline"):
        assert report["results"][method]["sentences_per_s"] > 0 and report["results"][method]["wall_s"] > 0
    assert report["max_abs_difference"] < 1e-5  # the same probabilities both ways
    assert "sentences/s" in result.stdout


def test_the_gpu_check_stops_at_once_without_a_gpu(tmp_path, tiny_model_dir):
    """Its preflight: every path given and readable, then no CUDA GPU: one line, nothing started."""
    output = tmp_path / "gpu-check"
    (tmp_path / "cola.zip").write_bytes(b"")
    (tmp_path / "blimp.zip").write_bytes(b"")
    paths = {"COLA_ZIP": tmp_path / "cola.zip", "BLIMP_ZIP": tmp_path / "blimp.zip", "TOKENIZER": tiny_model_dir}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(output)],
        capture_output=True,
        text=True,
        env={
            **offline_env(),
            "PYTHON": sys.executable,
            "CUDA_VISIBLE_DEVICES": "",
            **{k: str(v) for k, v in paths.items()},
        },
        cwd=tmp_path,
    )
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith("gpu_check: preflight: torch ") and "sees no CUDA GPU" in line and "\n" not in line
    assert all(path.stat().st_size == 0 for path in output.rglob("*") if path.is_file())  # no stage started


# --- in a run -------------------------------------------------------------------------------------------------
FAST = ["--report_to", "none", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--max_seq_length", "16"]


@pytest.fixture(scope="module")
def blimp_run(tmp_path_factory, cola_dir, tiny_model_dir, blimp_dir):
    output_dir = tmp_path_factory.mktemp("blimp-run") / "run"
    result = run_cola(
        "--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", output_dir,
        "--blimp_source", blimp_dir, "--num_train_epochs", "1", *FAST, in_process=True,
    )  # fmt: skip
    return output_dir, result


@pytest.mark.xdist_group("blimp-run")  # with the next test, on the module's blimp_run
def test_a_run_scores_every_pair_with_its_final_model_at_its_threshold(blimp_run, blimp_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    output_dir, result = blimp_run
    predictions = analysis.read_blimp_predictions(output_dir / analysis.PREDICTIONS_FILE)
    assert len(predictions.uids) == len(PARADIGMS) * PAIRS
    # The saved model, each sentence alone, gives the probabilities the run wrote, pair by pair.
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    lines = {uid: [json.loads(line) for line in paradigm_lines(uid)] for uid in PARADIGMS}
    rows = [0, 31, 149]
    pairs = [lines[predictions.uids[row]][int(predictions.pair_ids[row])] for row in rows]
    encode = [
        tokenizer(p[k], truncation=True, max_length=16)["input_ids"]
        for p in pairs
        for k in ("sentence_good", "sentence_bad")
    ]
    alone = one_by_one(model, encode)
    np.testing.assert_allclose(predictions.prob_good[rows], alone[0::2], atol=1e-6)
    np.testing.assert_allclose(predictions.prob_bad[rows], alone[1::2], atol=1e-6)
    saved = analysis.BlimpAnalysis.load(output_dir / analysis.BLIMP_JSON)
    threshold = json.loads((output_dir / "analysis.json").read_text())["threshold"]
    assert (saved.sentences.threshold, saved.sentences.threshold_chosen_on) == (threshold["threshold"], "validation")
    assert (output_dir / analysis.BLIMP_CHART).is_file() and (output_dir / analysis.BLIMP_MARKDOWN).is_file()
    card = (output_dir / "README.md").read_text()
    assert "### BLiMP: 67,000 minimal pairs" in card and analysis.phenomena_markdown(saved) in card
    assert f"BLiMP: {2 * len(predictions.uids)} sentences scored" in result.stderr


@pytest.mark.xdist_group("blimp-run")
def test_an_evaluation_only_run_scores_the_same_and_cola_compare_tests_the_two(blimp_run, blimp_dir, tmp_path):
    from cola_hf.cli.compare import main as compare_main

    trained, _ = blimp_run
    evaluated = tmp_path / "eval"
    cola_source = json.loads((trained / "results.json").read_text())["config"]["cola_source"]
    run_cola("--do_train", "False", "--model_name_or_path", trained, "--cola_source", cola_source,
             "--output_dir", evaluated, "--blimp_source", blimp_dir, *FAST, in_process=True)  # fmt: skip
    before = analysis.read_blimp_predictions(trained / analysis.PREDICTIONS_FILE)
    after = analysis.read_blimp_predictions(evaluated / analysis.PREDICTIONS_FILE)
    assert after.keys() == before.keys()
    np.testing.assert_allclose(after.prob_good, before.prob_good, atol=2e-6)
    np.testing.assert_allclose(after.prob_bad, before.prob_bad, atol=2e-6)
    assert np.array_equal(after.correct, before.correct)

    output = tmp_path / "comparison"
    assert compare_main([str(trained), str(evaluated), "--blimp", "--output", str(output)]) == 0
    table = (output / "blimp_comparison.md").read_text()
    assert "exact McNemar" in table
    overall = pd.read_csv(output / "blimp_comparison.csv").iloc[-1]
    assert overall["phenomenon"] == "overall" and overall["difference"] == 0 and overall["p_value"] == 1.0

    # Again over the same directory, offline with the default URL and no copy in the cache (--cache_dir, where the
    # run looks for downloads): the run completes without BLiMP, says in one line how to point at a copy, and
    # leaves none of the earlier run's BLiMP files.
    assert BLIMP_URL == parse_args([]).data.blimp_source
    result = run_cola(
        "--do_train", "False", "--model_name_or_path", trained, "--cola_source", cola_source,
        "--output_dir", evaluated, "--overwrite_output_dir", "true", "--blimp_source", BLIMP_URL, *FAST,
        "--cache_dir", tmp_path / "empty-cache",
    )  # fmt: skip
    said = [line for line in result.stderr.splitlines() if "BLiMP skipped" in line]
    assert len(said) == 1 and blimp.HOW_TO_PROVIDE in said[0]
    assert (evaluated / "results.json").is_file()
    assert not [name for name in analysis.OUTPUTS if (evaluated / name).exists()]
    assert "### BLiMP" not in (evaluated / "README.md").read_text()


@pytest.mark.parametrize(
    "source, message",
    [
        ("broken", "data/causative.jsonl:3: not valid JSON"),
        ("s3://bucket/BLiMP.zip", "s3://bucket/BLiMP.zip: unknown --blimp_source"),
        ("missing", "no such file or directory (--blimp_source)"),
    ],
)
def test_a_bad_blimp_source_stops_the_run_before_training(source, message, tmp_path, cola_dir, tiny_model_dir):
    if source == "broken":
        source = str(write_blimp_dir(tmp_path / "broken", bad_line("causative", 3, '{"UID": ')))
    elif source == "missing":
        source = str(tmp_path / "nowhere" / "BLiMP.zip")
    output_dir = tmp_path / "run"
    result = run_cola(
        "--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", output_dir,
        "--blimp_source", source, "--num_train_epochs", "1", *FAST, check=False, in_process=True,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("cola: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Longest tokenized sentence" not in result.stderr  # CoLA was not even tokenized
    assert not (output_dir / "trainer_state.json").exists() and not list(output_dir.glob("checkpoint-*"))
