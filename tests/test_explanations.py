"""Word-level explanations: completeness, the word alignment, every encoder family, the hit rates of a run's
explanations.json recomputed from its own scores, and the page counted by a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from scipy import stats
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cola_hf.analysis import explanations
from cola_hf.analysis.explanations import differing_words
from cola_hf.errors import UsageError
from cola_hf.training import attributions

SENTENCES = ["Our friends won't buy this analysis.", "The cat sat on the mat.", "Sat the on mat cat."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    # Drawn at 0.02 the weights make every sentence's margin the same to 1e-3; at 0.2 the words matter, so
    # completeness is a claim about real differences.
    torch.manual_seed(0)
    with torch.no_grad():
        for weights in model.parameters():
            if weights.dim() == 2:
                weights.normal_(0, 0.2)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def margins(model, tokenizer, texts: list[str]) -> list[float]:
    """logit(acceptable) - logit(unacceptable), by the model itself, one sentence at a time."""
    values = []
    with torch.no_grad():
        for text in texts:
            logits = model(**tokenizer(text, return_tensors="pt", return_token_type_ids=False)).logits[0]
            values.append(float(logits[1] - logits[0]))
    return values


def test_word_scores_add_up_to_the_margin_change_within_the_reported_delta(tiny):
    model, tokenizer = tiny
    real = margins(model, tokenizer, SENTENCES)
    for method in attributions.METHODS:
        scored = attributions.attribute_words(model, tokenizer, SENTENCES, method=method, batch_size=2)
        for attribution, margin in zip(scored, real, strict=True):
            assert attribution.margin == pytest.approx(margin, abs=1e-4)  # batched and padded: the same margin
            change = attribution.margin - attribution.baseline_margin
            assert abs(change) > 0.02
            assert abs(sum(attribution.scores) - change) <= abs(attribution.delta) + 1e-4
            if method == "integrated_gradients":  # exact up to a small delta; gradient x input is not
                assert abs(attribution.delta) < 0.01 * abs(change) and not attribution.large_delta
    first = attributions.attribute_words(model, tokenizer, SENTENCES[:1])[0]
    assert first.words == ["Our", "friends", "won", "'", "t", "buy", "this", "analysis", "."]
    again = attributions.attribute_words(model, tokenizer, SENTENCES[:1])[0]
    assert again.scores == first.scores  # deterministic


@pytest.mark.parametrize(
    ("good", "bad", "expected"),
    [
        ("The cats sleep .", "The cats sleeps .", "sleeps"),  # substitution
        ("Who did you see ?", "Who did you see him ?", "him"),  # insertion
        ("She gave him a book .", "She gave a book .", "gave a"),  # deletion: the gap's two neighbours
        ("Who has John seen ?", "Who John has seen ?", "John has"),  # a swap
        ("I wonder what John bought .", "I wonder John bought what .", "John bought what"),  # a long move
        ("Many girls insulted themselves .", "Many girls insulted herself .", "herself"),
        ("The Dog barked .", "the dog barked .", ""),  # case-blind
    ],
)
def test_the_alignment_marks_the_words_that_differ(good, bad, expected):
    words = bad.split()
    flags = differing_words(good.split(), words)
    assert [word for word, flag in zip(words, flags, strict=True) if flag] == expected.split()


def family_models(tokenizer) -> dict[str, torch.nn.Module]:
    """Tiny random classifiers of the six encoder families the package fine-tunes, on one WordPiece vocabulary."""
    from transformers import (
        AlbertConfig,
        BertConfig,
        DebertaV2Config,
        DistilBertConfig,
        ElectraConfig,
        RobertaConfig,
    )

    common = {"vocab_size": len(tokenizer), "num_labels": 2, "max_position_embeddings": 64, "pad_token_id": 0}
    layers = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    configs = {
        "bert": BertConfig(**common, **layers),
        "roberta": RobertaConfig(**common, **layers),
        "distilbert": DistilBertConfig(**common, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "albert": AlbertConfig(**common, **layers, embedding_size=16),
        "electra": ElectraConfig(**common, **layers, embedding_size=16),
        "deberta-v2": DebertaV2Config(**common, **layers),
    }
    torch.manual_seed(0)
    return {name: AutoModelForSequenceClassification.from_config(config).eval() for name, config in configs.items()}


def test_every_encoder_family_gets_word_attributions(tiny):
    _, tokenizer = tiny
    for family, model in family_models(tokenizer).items():
        scored = attributions.attribute_words(model, tokenizer, SENTENCES[1:])
        for attribution, text in zip(scored, SENTENCES[1:], strict=True):
            assert attribution.words == text.replace(".", " .").split(), family
            assert all(map(torch.isfinite, torch.tensor(attribution.scores))), family
            change = attribution.margin - attribution.baseline_margin
            assert abs(sum(attribution.scores) - change) <= abs(attribution.delta) + 1e-5, family


def test_bad_input_is_one_line(tiny):
    from transformers import ByT5Tokenizer  # a slow tokenizer that needs no files

    model, tokenizer = tiny
    with pytest.raises(UsageError, match="empty sentence"):
        attributions.attribute_words(model, tokenizer, ["The cat sat.", "  "])
    slow = ByT5Tokenizer()
    assert not slow.is_fast
    with pytest.raises(UsageError, match="slow tokenizer has no word ids") as raised:
        attributions.attribute_words(model, slow, ["The cat sat."])
    assert "\n" not in str(raised.value)
    long = " ".join(["cat"] * 20) + "."
    (truncated,) = attributions.attribute_words(model, tokenizer, [long], max_length=8)
    assert (len(truncated.words), truncated.truncated_words) == (6, 15)  # [CLS] + 6 + [SEP]; 14 cats and "."
    sentence = explanations.explained_sentence(truncated)
    assert "truncated at --max_seq_length: 15 word(s) not seen" in explanations.sentence_html(sentence)


@pytest.fixture(scope="module")
def explained_run(tiny_model_dir, cola_dir, blimp_dir, tmp_path_factory) -> Path:
    from cola_hf.cli.train import main

    output_dir = tmp_path_factory.mktemp("explained")
    argv = ["--do_train", "False", "--model_name_or_path", str(tiny_model_dir), "--cola_source", str(cola_dir),
            "--blimp_source", str(blimp_dir), "--annotations_source", "none", "--report_to", "none",
            "--disable_tqdm", "true", "--max_seq_length", "16", "--explain_pairs", "3", "--output_dir"]  # fmt: skip
    assert main([*argv, str(output_dir)]) == 0
    return output_dir


def test_the_hit_rates_are_those_of_the_written_scores(explained_run):
    record = explanations.Explanations.load(explained_run / explanations.EXPLANATIONS_JSON)
    assert len(record.pairs) == 5 * 3  # 5 paradigms x --explain_pairs
    assert len(record.errors) == 2 * 5
    groups = defaultdict(list)
    for pair in record.pairs:
        bad = pair.bad
        lowest = min(bad.scores)
        hit = bad.differing[bad.scores.index(lowest)]
        chance = sum(bad.differing) / len(bad.words)
        for name in (pair.phenomenon, explanations.OVERALL):
            for group in ("all", "model_right" if pair.model_right else "model_wrong"):
                groups[name, group].append((hit, chance))
    for (name, group), rows in groups.items():
        rate = getattr(record.hits[name], group)
        hits = sum(hit for hit, _ in rows)
        assert (rate.n, rate.hits) == (len(rows), hits)
        assert rate.chance == pytest.approx(sum(chance for _, chance in rows) / len(rows))
        interval = stats.binomtest(hits, len(rows)).proportion_ci(method="wilson")
        assert (rate.ci_low, rate.ci_high) == pytest.approx((interval.low, interval.high))
    card = (explained_run / "README.md").read_text()
    assert explanations.hits_markdown(record) in card and "(explanations.html)" in card


def test_explain_pairs_0_leaves_no_explanations(explained_run, tiny_model_dir, cola_dir):
    from cola_hf.cli.train import main

    argv = ["--do_train", "False", "--model_name_or_path", str(tiny_model_dir), "--cola_source", str(cola_dir),
            "--blimp_source", "none", "--annotations_source", "none", "--report_to", "none", "--disable_tqdm", "true",
            "--max_seq_length", "16", "--explain_pairs", "0", "--overwrite_output_dir", "true"]  # fmt: skip
    copy = explained_run.parent / "skipped"
    shutil.copytree(explained_run, copy)
    assert main([*argv, "--output_dir", str(copy)]) == 0
    assert not (copy / explanations.EXPLANATIONS_JSON).exists()
    assert not (copy / explanations.EXPLANATIONS_HTML).exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
def test_the_page_shades_the_expected_words_in_a_real_browser(explained_run, tmp_path):
    record = explanations.Explanations.load(explained_run / explanations.EXPLANATIONS_JSON)
    sentences = [error.sentence for error in record.errors]
    sentences += [sentence for pair in record.pairs for sentence in (pair.good, pair.bad)]
    expected = sum(score != 0 for sentence in sentences for score in sentence.scores)
    assert expected > 0
    page = explained_run / explanations.EXPLANATIONS_HTML
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched: no network
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    ).stdout  # fmt: skip
    counted = re.search(r'<output id="shaded-count">(\d+)</output>', dom)
    assert counted is not None, dom[-2000:]
    assert int(counted.group(1)) == expected


def test_cola_predict_explain_gives_word_scores_in_every_output(tiny_model_dir, tmp_path, capsys):
    import json

    from cola_hf.cli.predict import main as predict_main

    page = tmp_path / "why.html"
    argv = ["--model", str(tiny_model_dir), "--explain", "--explain_html", str(page)]
    assert predict_main([*argv, "--format", "jsonl", *SENTENCES[1:]]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["words"] for record in records] == [text.replace(".", " .").split() for text in SENTENCES[1:]]
    assert all(len(record["word_scores"]) == len(record["words"]) for record in records)
    assert page.read_text().count('<span class="w"') == sum(len(record["words"]) for record in records)
    assert predict_main([*argv, "The cat sat."]) == 0  # not a terminal: the signed-score form in a TSV column
    header, row = capsys.readouterr().out.splitlines()
    assert header.split("\t")[-1] == "word_scores"
    assert re.fullmatch(
        r"The\([+-]\d\.\d\d\) cat\([+-]\d\.\d\d\) sat\([+-]\d\.\d\d\) \.\([+-]\d\.\d\d\)", row.split("\t")[-1]
    )
    assert predict_main(["--model", str(tiny_model_dir), "--explain_html", str(page), "The cat sat."]) == 2
    assert capsys.readouterr().err == "cola-predict: error: --explain_html needs --explain\n"


def test_a_terminal_gets_each_word_on_its_shade():
    line = explanations.terminal_line(["Sat", "the", "cat"], [-1.0, 0.5, 0.0], colour=True)
    assert line.split(" ") == [
        "\x1b[48;2;255;80;80m\x1b[38;2;0;0;0mSat\x1b[0m",  # the strongest push toward "unacceptable": deepest red
        "\x1b[48;2;167;167;255m\x1b[38;2;0;0;0mthe\x1b[0m",  # half as strong, toward "acceptable": light blue
        "\x1b[48;2;255;255;255m\x1b[38;2;0;0;0mcat\x1b[0m",  # no push: white
    ]
    assert explanations.terminal_line(["Sat"], [-1.0], colour=False) == "Sat(-1.00)"
