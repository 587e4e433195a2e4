"""Label sentences as acceptable or unacceptable with a fine-tuned model: the engine of `cola-predict`.

A model is a run's output directory or its Hub id, loaded by `transformers.pipeline("text-classification")`.
Input problems (a missing file, a malformed CoLA TSV, a model that cannot be loaded) raise `UsageError`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
from tqdm.auto import tqdm

from cola_hf.analysis.explanations import ExplainedSentence, explained_sentence, sentences_page, terminal_line
from cola_hf.errors import UsageError, one_line
from cola_hf.file_io import atomic_path, read_text, read_tsv, write_text

if TYPE_CHECKING:
    from transformers import Pipeline


@dataclass
class Sentences:
    """What to classify, and what was left out of it."""

    texts: list[str]
    # Gold labels (0/1), when the input was a CoLA-format TSV.
    labels: list[int] | None = None
    # Where the empty entries were: line numbers of a file, or positions of command-line arguments.
    skipped: list[int] = field(default_factory=list)


@dataclass
class Prediction:
    sentence: str
    label: str
    # Probability of every label; they sum to 1.
    scores: dict[str, float]
    # With --explain: the words the model saw and each one's push toward "acceptable" (negative: "unacceptable").
    words: list[str] | None = None
    word_scores: list[float] | None = None
    truncated_words: int = 0

    @property
    def probability(self) -> float:
        """Probability of the predicted label."""
        return self.scores[self.label]


def from_arguments(sentences: Sequence[str]) -> Sentences:
    kept = [text for text in sentences if text.strip()]
    skipped = [position for position, text in enumerate(sentences, start=1) if not text.strip()]
    return Sentences(kept, skipped=skipped)


def read_input(path: str | Path) -> Sentences:
    """One sentence per line (blank lines skipped), or a CoLA-format TSV (4 columns, label 0/1) with its labels."""
    path = Path(path)
    text = read_text(path)
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if text.endswith("\n"):
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    first = next((line for line in lines if line.strip()), None)
    if first is not None and _is_cola_row(first):
        # Imported here: the datasets-based reader is only needed for labelled files.
        from cola_hf.data.cola import read_cola_tsv

        dataset = read_cola_tsv(path)  # validates every line, naming file and line on error
        return Sentences(list(dataset["sentence"]), labels=list(dataset["label"]))
    return Sentences(
        [line for line in lines if line.strip()],
        skipped=[number for number, line in enumerate(lines, start=1) if not line.strip()],
    )


def _is_cola_row(line: str) -> bool:
    fields = line.split("\t")
    return len(fields) == 4 and fields[1] in ("0", "1")


def load_classifier(model: str) -> Pipeline:
    """The text-classification pipeline of a local directory or a Hub id (on the GPU when there is one)."""
    # A Hub id is `name` or `namespace/name`; anything else that does not exist is a mistyped directory.
    if not Path(model).expanduser().exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        raise UsageError(f"--model {model}: no such directory")
    # Imported here: torch and transformers take seconds to load, and reading the input should fail first.
    from safetensors import SafetensorError
    from transformers import pipeline

    from cola_hf.training.model import unreadable_weights

    try:
        # float32 whatever the checkpoint was saved in (the pipeline's "auto" keeps a bf16 save in bf16, whose
        # probabilities differ from the run's own predictions).
        return pipeline("text-classification", model=model, dtype="float32")
    except SafetensorError as err:
        raise UsageError(f"--model {model}: {unreadable_weights(model, err)}") from err
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {model}: cannot load a text-classification model ({one_line(err)})") from err


def model_max_length(classifier: Pipeline) -> int:
    """The longest input the model takes: the tokenizer's limit, capped by the position embeddings."""
    limits = [classifier.tokenizer.model_max_length, getattr(classifier.model.config, "max_position_embeddings", None)]
    # A tokenizer saved without a limit reports a huge sentinel (int(1e30)); the config then decides.
    usable = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(usable) if usable else 512


def count_too_long(classifier: Pipeline, texts: Sequence[str], max_length: int) -> int:
    """How many sentences have more than `max_length` tokens (with [CLS]/[SEP]), so truncation will cut them.

    Tokenizing with a limit one above `max_length` tells without the tokenizer's too-long warning.
    """
    lengths = classifier.tokenizer(list(texts), truncation=True, max_length=max_length + 1, return_length=True)
    return sum(length > max_length for length in lengths["length"])


def classify(
    classifier: Pipeline,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
) -> list[Prediction]:
    """Every label's probability for each sentence, in order; sentences over `max_length` tokens are truncated."""
    max_length = max_length or model_max_length(classifier)
    outputs: Iterator = classifier(
        (text for text in texts),  # a generator makes the pipeline stream batches, so the bar can follow
        batch_size=batch_size,
        top_k=None,
        truncation=True,
        max_length=max_length,
    )
    bar = tqdm(outputs, total=len(texts), unit="sentence", disable=None if progress else True, file=sys.stderr)
    return [
        Prediction(text, max(scores, key=lambda s: s["score"])["label"], {s["label"]: s["score"] for s in scores})
        for text, scores in zip(texts, bar, strict=True)
    ]


def explain(
    classifier: Pipeline, predictions: Sequence[Prediction], batch_size: int = 16, max_length: int | None = None
) -> list[ExplainedSentence]:
    """Per-word attributions of every prediction's sentence (cola_hf/training/attributions.py), stored on them."""
    from cola_hf.training.attributions import attribute_words

    scored = attribute_words(
        classifier.model,
        classifier.tokenizer,
        [prediction.sentence for prediction in predictions],
        batch_size=batch_size,
        max_length=max_length or model_max_length(classifier),
    )
    for prediction, attribution in zip(predictions, scored, strict=True):
        prediction.words, prediction.word_scores = attribution.words, attribution.scores
        prediction.truncated_words = attribution.truncated_words
    return [explained_sentence(attribution) for attribution in scored]


def write_explained(predictions: Sequence[Prediction], stream: TextIO, *, colour: bool) -> None:
    """Each sentence's label and probability, then its words shaded (`colour`) or with their signed scores."""
    for p in predictions:
        assert p.words is not None and p.word_scores is not None
        cut = f"  [truncated: {p.truncated_words} word(s) not seen]" if p.truncated_words else ""
        line = terminal_line(p.words, p.word_scores, colour=colour)
        stream.write(f"{p.label}\t{p.probability:.6f}\t{line}{cut}\n")


def write_explanation_page(
    path: str | Path, predictions: Sequence[Prediction], sentences: Sequence[ExplainedSentence]
) -> None:
    """--explain_html: the sentences shaded on one self-contained page."""
    labelled = [
        (f"{p.label} ({p.probability:.3f})", sentence) for p, sentence in zip(predictions, sentences, strict=True)
    ]
    try:
        write_text(path, sentences_page(labelled))
    except OSError as err:
        raise UsageError(f"--explain_html {path}: cannot write ({err.strerror})") from err


def label_ids(classifier: Pipeline, predictions: Sequence[Prediction]) -> np.ndarray:
    label2id = classifier.model.config.label2id
    return np.array([label2id[prediction.label] for prediction in predictions])


def write_labelled(predictions: Sequence[Prediction], stream: TextIO, output_format: str = "tsv") -> None:
    """TSV (header sentence, label, probability) or JSON lines (the same, plus every label's probability)."""
    if output_format == "jsonl":
        for p in predictions:
            record = {"sentence": p.sentence, "label": p.label, "probability": p.probability, "scores": p.scores}
            if p.words is not None:
                record |= {"words": p.words, "word_scores": p.word_scores, "truncated_words": p.truncated_words}
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    explained = bool(predictions) and predictions[0].words is not None
    stream.write("sentence\tlabel\tprobability" + ("\tword_scores" if explained else "") + "\n")
    for p in predictions:
        # No quoting, like the CoLA files: sentences hold quotes. A tab would split the row, so it becomes a space.
        row = f"{p.sentence.replace(chr(9), ' ')}\t{p.label}\t{p.probability:.6f}"
        if explained:
            row += "\t" + terminal_line(p.words or [], p.word_scores or [], colour=False).replace("\t", " ")
        stream.write(row + "\n")


GLUE_TEST_HEADER = ("index", "sentence")
GLUE_TEST_ROWS = 1063  # GLUE's CoLA test.tsv


@dataclass
class GlueTest:
    """GLUE's CoLA test file: each row's index and sentence, in file order."""

    indices: list[str]
    texts: list[str]


def read_glue_test(path: str | Path) -> GlueTest:
    """Read GLUE's CoLA test.tsv (header `index<TAB>sentence`); anything else raises naming file and line."""
    path = Path(path)
    header, rows = read_tsv(path)
    if tuple(header) != GLUE_TEST_HEADER:
        shown = "\t".join(header)[:60]
        raise UsageError(f"{path}:1: expected GLUE's CoLA test header 'index<TAB>sentence', found {shown!r}")
    indices, texts = [], []
    for number, fields in rows:
        if len(fields) != 2 or not fields[0].isdigit() or not fields[1].strip():
            raise UsageError(f"{path}:{number}: expected 2 tab-separated columns, an index and a sentence")
        indices.append(fields[0])
        texts.append(fields[1])
    if not texts:
        raise UsageError(f"{path}: no sentences after the header")
    return GlueTest(indices, texts)


def write_glue_submission(path: str | Path, indices: Sequence[str], label_ids: np.ndarray) -> None:
    """GLUE's submission file for CoLA: header `index<TAB>prediction`, 1 acceptable, 0 unacceptable."""
    lines = ["index\tprediction", *(f"{index}\t{int(label)}" for index, label in zip(indices, label_ids, strict=True))]
    try:
        with atomic_path(path) as temporary:
            temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as err:
        raise UsageError(f"--glue_submission {path}: cannot write ({err.strerror})") from err
