"""Word-level explanations checked against BLiMP's minimal pairs: the word alignment of a pair, the hit rates,
explanations.json (typed) and the self-contained page explanations.html.

A BLiMP pair's two sentences differ in one point of grammar. When the classifier explains its judgment of the
unacceptable sentence, the word it blames most (the most negative score, toward "unacceptable") is a **hit**
when it is one of the words that differ from the acceptable sentence (`differing_words`). Chance is the share of
differing words in the sentence: a blame drawn at random hits that often. Pure functions of what was written:
the scores come from cola_hf/training/attributions.py through the run.
"""

from __future__ import annotations

import difflib
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_hf.analysis.blimp_report import phenomenon
from cola_hf.file_io import JsonRecord, write_text
from cola_hf.run_files import EXPLANATIONS_HTML, EXPLANATIONS_JSON

SCHEMA_VERSION = 1
Z_95 = 1.959963984540054
OVERALL = "overall"


# --- the word alignment ---------------------------------------------------------------------------------------
def differing_words(good: Sequence[str], bad: Sequence[str]) -> list[bool]:
    """For each word of `bad`, whether it differs from `good` (words compared case-blind).

    The longest common subsequence aligns the two; a word of `bad` outside it differs (substitution,
    insertion). A word that moved (outside the subsequence in both, as the same word) marks every word it
    jumped over too: in "Who John has seen" against "Who has John seen", both "John" and "has" differ. A word
    deleted from `good` marks its neighbours in `bad`, the words on each side of the gap: the error is there.
    """
    good_keys, bad_keys = [word.lower() for word in good], [word.lower() for word in bad]
    flags = [False] * len(bad)
    inserted: dict[str, list[int]] = {}  # word -> its unaligned positions in bad
    deleted: list[tuple[str, int, bool]] = []  # (word, the gap's position in bad, a pure deletion)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, good_keys, bad_keys, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            for j in range(j1, j2):
                flags[j] = True
                inserted.setdefault(bad_keys[j], []).append(j)
        if tag in ("replace", "delete"):
            deleted.extend((good_keys[i], j1, tag == "delete") for i in range(i1, i2))
    for word, gap, pure in deleted:
        if inserted.get(word):  # moved: from the gap to where it now stands
            moved_to = inserted[word].pop(0)
            for j in range(min(moved_to, gap), max(moved_to, gap)):
                flags[j] = True
            flags[moved_to] = True
        elif pure:
            for j in (gap - 1, gap):
                if 0 <= j < len(bad):
                    flags[j] = True
    return flags


def blamed_word(scores: Sequence[float]) -> int:
    """The word that pushes hardest toward "unacceptable" (the first, on a tie)."""
    return min(range(len(scores)), key=lambda index: scores[index])


def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (defined at 0 and n hits, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan
    rate = hits / n
    centre = (rate + Z_95**2 / (2 * n)) / (1 + Z_95**2 / n)
    half = Z_95 * math.sqrt(rate * (1 - rate) / n + Z_95**2 / (4 * n * n)) / (1 + Z_95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- the schema of explanations.json --------------------------------------------------------------------------
@dataclass
class ExplainedSentence:
    text: str
    words: list[str]
    scores: list[float]  # per word, toward "acceptable" (negative: toward "unacceptable")
    margin: float  # logit(acceptable) - logit(unacceptable)
    baseline_margin: float
    delta: float  # sum(scores) - (margin - baseline_margin)
    large_delta: bool  # the scores do not add up to the margin change: read them with care
    truncated_words: int  # words past --max_seq_length, never seen
    differing: list[bool] = field(default_factory=list)  # BLiMP's unacceptable sentence: differs from the good one


@dataclass
class ExplainedPair:
    uid: str
    pair_id: str
    phenomenon: str
    good: ExplainedSentence
    bad: ExplainedSentence
    model_right: bool  # the model gave the acceptable sentence the higher P(acceptable)
    blamed: int  # index of the bad sentence's most negative word
    hit: bool  # that word is one of the differing words
    chance: float  # share of differing words in the bad sentence


@dataclass
class ExplainedError:
    """One of a test set's most confidently wrong sentences."""

    split: str
    label: int
    prob_acceptable: float
    sentence: ExplainedSentence


@dataclass
class HitRate:
    n: int
    hits: int
    hit_rate: float
    ci_low: float
    ci_high: float
    chance: float  # mean share of differing words over the same pairs


@dataclass
class PhenomenonHits:
    all: HitRate
    model_right: HitRate
    model_wrong: HitRate


@dataclass
class Explanations(JsonRecord):
    method: str
    ig_steps: int
    baseline: str
    pairs_per_paradigm: int
    seed: int
    max_seq_length: int
    hits: dict[str, PhenomenonHits]  # by phenomenon, and OVERALL
    pairs: list[ExplainedPair]
    errors: list[ExplainedError]
    sentences: int = 0
    seconds: float = 0.0
    sentences_per_second: float = 0.0
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION


def explained_pair(
    uid: str, pair_id: str, term: str, good: ExplainedSentence, bad: ExplainedSentence, model_right: bool
) -> ExplainedPair:
    bad.differing = differing_words(good.words, bad.words)
    blamed = blamed_word(bad.scores)
    return ExplainedPair(
        uid=uid,
        pair_id=pair_id,
        phenomenon=phenomenon(term),
        good=good,
        bad=bad,
        model_right=model_right,
        blamed=blamed,
        hit=bad.differing[blamed],
        chance=sum(bad.differing) / len(bad.differing),
    )


def hit_rate(pairs: Sequence[ExplainedPair]) -> HitRate:
    hits = sum(pair.hit for pair in pairs)
    low, high = wilson_interval(hits, len(pairs))
    return HitRate(
        n=len(pairs),
        hits=hits,
        hit_rate=hits / len(pairs) if pairs else math.nan,
        ci_low=low,
        ci_high=high,
        chance=sum(pair.chance for pair in pairs) / len(pairs) if pairs else math.nan,
    )


def hit_table(pairs: Sequence[ExplainedPair]) -> dict[str, PhenomenonHits]:
    """Hit rates by phenomenon and overall, over all pairs, those the model gets right and those it gets wrong."""
    groups = {
        name: [pair for pair in pairs if pair.phenomenon == name] for name in sorted({p.phenomenon for p in pairs})
    }
    groups[OVERALL] = list(pairs)
    return {
        name: PhenomenonHits(
            all=hit_rate(members),
            model_right=hit_rate([pair for pair in members if pair.model_right]),
            model_wrong=hit_rate([pair for pair in members if not pair.model_right]),
        )
        for name, members in groups.items()
    }


# --- explanations.md's table, the card's ------------------------------------------------------------------------
def _rate(rate: HitRate) -> str:
    if rate.n == 0:
        return "-"
    return f"{rate.hit_rate:.2f} [{rate.ci_low:.2f}, {rate.ci_high:.2f}] (n={rate.n})"


def hits_markdown(explanations: Explanations) -> str:
    """The hit-rate table: per phenomenon and overall, beside chance, over all pairs and by the model's verdict."""
    lines = [
        "| phenomenon | hit rate [95% CI] | chance | model right | model wrong |",
        "|---|---|---|---|---|",
    ]
    for name, row in explanations.hits.items():
        label = f"**{name}**" if name == OVERALL else name
        cells = [label, _rate(row.all), f"{row.all.chance:.2f}", _rate(row.model_right), _rate(row.model_wrong)]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def card_section(explanations: Explanations) -> str:
    """The model card's section: the hit-rate table and a link to the page."""
    return (
        "\n## Why did the model say so?\n\n"
        f"Word-level explanations ({explanations.method}) of the test sets' most confidently wrong sentences and "
        f"of {explanations.pairs_per_paradigm} BLiMP pair(s) per paradigm: [{EXPLANATIONS_HTML}]({EXPLANATIONS_HTML}). "
        "A hit: the word the model blames most in the unacceptable sentence is one of the words that differ from "
        "the acceptable one; chance: the share of such words.\n\n" + hits_markdown(explanations) + "\n"
    )


# --- explanations.html ----------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
.s { margin: 0.3em 0 0.8em; line-height: 2; }
.w { padding: 0.1em 0.2em; border-radius: 0.2em; }
.diff { border-bottom: 3px solid #222; }
.blamed { outline: 2px dashed #b00; }
.note { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; }
"""
# The page counts its own shaded words (a browser's computed styles, not the file's text) and says how many.
COUNT_SCRIPT = """
document.addEventListener("DOMContentLoaded", function () {
  var shaded = 0;
  document.querySelectorAll("span.w").forEach(function (word) {
    var colour = getComputedStyle(word).backgroundColor;
    if (colour !== "rgba(0, 0, 0, 0)" && colour !== "transparent") { shaded += 1; }
  });
  document.getElementById("shaded-count").textContent = String(shaded);
});
"""


def shade(score: float, largest: float) -> str | None:
    """The background of a word: red toward "unacceptable", blue toward "acceptable", as deep as its share of the
    sentence's largest score; None (no shade) for a word that did not move the margin."""
    if largest <= 0 or score == 0:
        return None
    alpha = min(1.0, abs(score) / largest) * 0.8 + 0.05
    red, green, blue = (200, 30, 30) if score < 0 else (30, 90, 200)
    return f"rgba({red}, {green}, {blue}, {alpha:.2f})"


def shaded_count(sentence: ExplainedSentence) -> int:
    largest = max((abs(score) for score in sentence.scores), default=0.0)
    return sum(shade(score, largest) is not None for score in sentence.scores)


def sentence_html(sentence: ExplainedSentence, blamed: int | None = None) -> str:
    largest = max((abs(score) for score in sentence.scores), default=0.0)
    spans = []
    for index, (word, score) in enumerate(zip(sentence.words, sentence.scores, strict=True)):
        classes = ["w"]
        if sentence.differing and sentence.differing[index]:
            classes.append("diff")
        if index == blamed:
            classes.append("blamed")
        colour = shade(score, largest)
        style = f' style="background-color: {colour}"' if colour else ""
        spans.append(f'<span class="{" ".join(classes)}"{style} title="{score:+.3f}">{html.escape(word)}</span>')
    notes = [f"margin {sentence.margin:+.2f}"]
    if sentence.truncated_words:
        notes.append(f"truncated at --max_seq_length: {sentence.truncated_words} word(s) not seen")
    if sentence.large_delta:
        notes.append(f"large convergence delta ({sentence.delta:+.3f}): the scores do not add up to the margin")
    return f'<div class="s">{" ".join(spans)} <span class="note">({"; ".join(notes)})</span></div>'


def page_html(explanations: Explanations) -> str:
    """One page, no network: the style and the script are inline, no fonts or images are fetched."""
    rows = []
    for name, row in explanations.hits.items():
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{_rate(row.all)}</td><td>{row.all.chance:.2f}</td>"
            f"<td>{_rate(row.model_right)}</td><td>{_rate(row.model_wrong)}</td></tr>"
        )
    errors = [
        f"<h3>{html.escape(error.split)}: gold {'acceptable' if error.label else 'unacceptable'}, "
        f"P(acceptable) {error.prob_acceptable:.3f}</h3>{sentence_html(error.sentence)}"
        for error in explanations.errors
    ]
    pairs = [
        f"<h3>{html.escape(pair.uid)} #{html.escape(pair.pair_id)} ({html.escape(pair.phenomenon)}): "
        f"{'hit' if pair.hit else 'miss'}, model {'right' if pair.model_right else 'wrong'}</h3>"
        f'<div class="note">acceptable</div>{sentence_html(pair.good)}'
        f'<div class="note">unacceptable</div>{sentence_html(pair.bad, pair.blamed)}'
        for pair in explanations.pairs
    ]
    notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in explanations.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Why did the model say so?</title>
<style>{STYLE}</style><script>{COUNT_SCRIPT}</script></head><body>
<h1>Why did the model say so?</h1>
<p>Each word is shaded by how much it moved the model's margin, logit(acceptable) - logit(unacceptable):
<span class="key" style="background-color: rgba(200, 30, 30, 0.6)">red</span> toward "unacceptable",
<span class="key" style="background-color: rgba(30, 90, 200, 0.6)">blue</span> toward "acceptable" (hover for the
score). Method: {html.escape(explanations.method)}; baseline: {html.escape(explanations.baseline)}. In BLiMP's
unacceptable sentences, <span class="diff">underlined</span> words differ from the acceptable sentence and the
<span class="blamed">dashed</span> word is the one blamed most. An explanation of this classifier's decision,
not a grammatical analysis (docs/analysis.md).</p>{notes}
<p class="note">Words shaded on this page: <output id="shaded-count">(needs JavaScript)</output></p>
<h2>Hit rate on BLiMP's pairs</h2>
<table><tr><th>phenomenon</th><th>hit rate [95% CI]</th><th>chance</th><th>model right</th><th>model wrong</th></tr>
{"".join(rows)}</table>
<h2>The test sets' most confidently wrong sentences</h2>
{"".join(errors) or "<p>None.</p>"}
<h2>BLiMP's pairs</h2>
{"".join(pairs) or "<p>None.</p>"}
</body></html>
"""


def sentences_page(labelled: Sequence[tuple[str, ExplainedSentence]]) -> str:
    """cola-predict's page (--explain_html): each sentence under its label, shaded as in explanations.html."""
    body = "".join(f"<h3>{html.escape(label)}</h3>{sentence_html(sentence)}" for label, sentence in labelled)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Why did the model say so?</title>
<style>{STYLE}</style><script>{COUNT_SCRIPT}</script></head><body>
<h1>Why did the model say so?</h1>
<p><span class="key" style="background-color: rgba(200, 30, 30, 0.6)">Red</span> words pushed toward
"unacceptable", <span class="key" style="background-color: rgba(30, 90, 200, 0.6)">blue</span> toward
"acceptable" (hover for the score).</p>
<p class="note">Words shaded on this page: <output id="shaded-count">(needs JavaScript)</output></p>
{body}</body></html>
"""


def write_explanations(output_dir: str | Path, explanations: Explanations) -> None:
    """explanations.json and explanations.html."""
    output_dir = Path(output_dir)
    write_text(output_dir / EXPLANATIONS_JSON, explanations.to_json())
    write_text(output_dir / EXPLANATIONS_HTML, page_html(explanations))


def remove_explanations(output_dir: str | Path) -> None:
    """An earlier run's explanations, gone: a run that skips them must not look as if it had made them."""
    for name in (EXPLANATIONS_JSON, EXPLANATIONS_HTML):
        (Path(output_dir) / name).unlink(missing_ok=True)


def explained_sentence(attribution: Any) -> ExplainedSentence:
    """From the training layer's SentenceAttribution (read by its fields: analysis never imports a model's code)."""
    return ExplainedSentence(
        text=attribution.text,
        words=list(attribution.words),
        scores=[float(score) for score in attribution.scores],
        margin=float(attribution.margin),
        baseline_margin=float(attribution.baseline_margin),
        delta=float(attribution.delta),
        large_delta=bool(attribution.large_delta),
        truncated_words=int(attribution.truncated_words),
    )


# --- the terminal ----------------------------------------------------------------------------------------------
def terminal_line(words: Sequence[str], scores: Sequence[float], *, colour: bool) -> str:
    """A sentence for the terminal: words on 24-bit backgrounds with `colour`, else each word with its score."""
    if not colour:
        return " ".join(f"{word}({score:+.2f})" for word, score in zip(words, scores, strict=True))
    largest = max((abs(score) for score in scores), default=0.0)
    parts = []
    for word, score in zip(words, scores, strict=True):
        depth = min(1.0, abs(score) / largest) if largest > 0 else 0.0
        fade = int(255 - 175 * depth)
        red, green, blue = (255, fade, fade) if score < 0 else (fade, fade, 255)
        parts.append(f"\x1b[48;2;{red};{green};{blue}m\x1b[38;2;0;0;0m{word}\x1b[0m")
    return " ".join(parts)
