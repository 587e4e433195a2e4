"""CoLA's grammatical-phenomena annotation of the GLUE dev set: find it, read it, check it against CoLA 1.1.

Warstadt and Bowman (2019, arXiv:1901.03438) marked each of the 1043 GLUE dev sentences (in_domain_dev then
out_of_domain_dev, in file order) with 15 major and 63 minor features. Their file predates two fixes in CoLA 1.1,
so rows are joined by position and the text is checked: the known differences pass (CoLA 1.1's labels are kept),
anything else is a `UsageError` naming the file and row.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cola_hf.errors import UsageError
from cola_hf.file_io import read_tsv

logger = logging.getLogger(__name__)

ANNOTATIONS_URL = "https://nyu-mll.github.io/CoLA/CoLA_grammatical_annotations.zip"
MAJOR_FILE = "CoLA_grammatical_annotations_major_features.tsv"
MINOR_FILE = "CoLA_grammatical_annotations_minor_features.tsv"
LEADING_COLUMNS = ("Source", "Domain", "Acceptability", "Sentence")
MAJOR_FEATURES = (
    "Simple",
    "Predicate",
    "Adjunct",
    "Argument Type",
    "Arg Altern",
    "Imperative",
    "Binding",
    "Question",
    "Comp Clause",
    "Auxiliary",
    "to-VP",
    "N, Adj",
    "S-Syntax",
    "Determiner",
    "Violations",
)
# Where the annotated file and CoLA 1.1 differ, by glue_dev row (0-based). Sentences are kept out of the code
# (they are excerpts of published works): a fingerprint of the two texts stands for them.
KNOWN_TEXT_FIXES = {329: "b2578c179e46", 584: "1c43c51540b1", 728: "17f10f8111ab", 730: "d045025f11b7"}
KNOWN_LABEL_CHANGES = {53: (0, 1), 496: (0, 1)}  # (annotated label, CoLA 1.1 label)
HOW_TO_PROVIDE = "--annotations_source path/to/CoLA_grammatical_annotations.zip"


@dataclass
class Annotations:
    """One 0/1 column per feature, rows in glue_dev order; where the file came from."""

    path: Path
    features: dict[str, np.ndarray]
    sources: list[str]
    labels: np.ndarray
    sentences: list[str]


def text_fingerprint(annotated: str, cola: str) -> str:
    return hashlib.sha256(f"{annotated}\t{cola}".encode()).hexdigest()[:12]


def annotations_dir(source: str | None, cache_dir: str | None = None) -> Path | None:
    """The directory holding the annotation TSVs; None (with one log line) when a URL cannot be fetched.

    A local zip or directory that cannot be read raises `UsageError`: that is a mistake to fix, while a
    download that fails (offline) leaves the rest of the analysis to go on.
    """
    # Imported here: the sources load datasets, which cola-compare's parser should not wait for.
    from cola_hf.data.sources import download, is_url, local_root

    if source is None:
        logger.info("Phenomena skipped: no annotations; to get them pass %s", HOW_TO_PROVIDE)
        return None
    if is_url(source):
        try:
            # The annotations of 2019 do not change: once downloaded, the cached copy serves offline too.
            root = download(source, cache_dir, check_for_updates=False)
        except (OSError, ConnectionError) as err:
            logger.warning(
                "Phenomena skipped: cannot download %s (%s); offline, pass %s",
                source,
                type(err).__name__,
                HOW_TO_PROVIDE,
            )
            return None
    else:
        root = local_root(
            Path(source).expanduser(),
            option="--annotations_source",
            expected="CoLA_grammatical_annotations.zip or a directory holding its TSVs",
        )
    if (root / MAJOR_FILE).is_file():
        return root
    nested = [path.parent for path in root.rglob(MAJOR_FILE) if "__MACOSX" not in path.parts]
    if not nested:
        raise UsageError(f"{source}: no {MAJOR_FILE} in it (--annotations_source)")
    return nested[0]


def read_annotation_file(path: Path, features: tuple[str, ...] | None = None) -> Annotations:
    """Read one annotation TSV; `features` are the columns it must have after the leading four (None: any)."""
    header, lines = read_tsv(path, "--annotations_source")
    names = tuple(header[len(LEADING_COLUMNS) :])
    if tuple(header[: len(LEADING_COLUMNS)]) != LEADING_COLUMNS or not names or (features and names != features):
        then = ", ".join(features) if features else "one column per feature"
        raise UsageError(f"{path}:1: wrong header; expected tab-separated {', '.join(LEADING_COLUMNS)}, then {then}")
    rows = []
    for number, fields in lines:
        if len(fields) != len(header):
            raise UsageError(f"{path}:{number}: expected {len(header)} tab-separated columns, found {len(fields)}")
        if any(value not in ("0", "1") for value in (fields[2], *fields[len(LEADING_COLUMNS) :])):
            raise UsageError(f"{path}:{number}: Acceptability and feature columns must be 0 or 1")
        rows.append(fields)
    if not rows:
        raise UsageError(f"{path}: no rows")
    values = np.array([[int(value) for value in row[len(LEADING_COLUMNS) :]] for row in rows], dtype=np.int8)
    return Annotations(
        path=path,
        features={name: values[:, column] for column, name in enumerate(names)},
        sources=[row[0] for row in rows],
        labels=np.array([int(row[2]) for row in rows], dtype=np.int8),
        sentences=[row[3] for row in rows],
    )


def check_rows(
    annotations: Annotations, sources: list[str], labels: np.ndarray, sentences: list[str], where: Path
) -> str:
    """Check the annotation rows against glue_dev's, by position; return the one-line note on known differences."""
    if len(annotations.sentences) != len(sentences):
        raise UsageError(
            f"{annotations.path}: {len(annotations.sentences)} rows, but {where} has {len(sentences)}; "
            "expected the GLUE dev set (in_domain_dev then out_of_domain_dev)"
        )
    fixes = changes = 0
    for row, (annotated, sentence) in enumerate(zip(annotations.sentences, sentences, strict=True)):
        line = row + 2  # the header is line 1
        if annotations.sources[row] != sources[row]:
            raise UsageError(
                f"{annotations.path}:{line}: source {annotations.sources[row]!r}, but {where} row {line} has "
                f"{sources[row]!r}"
            )
        if annotated != sentence:
            if KNOWN_TEXT_FIXES.get(row) != text_fingerprint(annotated, sentence):
                raise UsageError(
                    f"{annotations.path}:{line}: sentence {annotated!r} differs from {where} row {line}: {sentence!r}"
                )
            fixes += 1
        if annotations.labels[row] != labels[row]:
            if KNOWN_LABEL_CHANGES.get(row) != (annotations.labels[row], labels[row]):
                raise UsageError(
                    f"{annotations.path}:{line}: label {annotations.labels[row]}, but {where} row {line} has "
                    f"{labels[row]}"
                )
            changes += 1
    if not fixes and not changes:
        return ""
    return (
        f"The annotations differ from CoLA 1.1 in {fixes} sentence(s) (typo fixes) and {changes} label(s); "
        "CoLA 1.1's sentences and labels are used."
    )


# Once per process: a run reads them before training (a wrong path fails early) and again for its analysis,
# and a study analyses every run. Nothing changes an Annotations after reading.
@functools.lru_cache(maxsize=8)
def load_annotations(
    source: str | None, minor_features: bool = False, cache_dir: str | None = None
) -> tuple[Annotations, Annotations | None] | None:
    """The major (and, with `minor_features`, minor) annotations, or None when they are not at hand."""
    directory = annotations_dir(source, cache_dir)
    if directory is None:
        return None
    major = read_annotation_file(directory / MAJOR_FILE, MAJOR_FEATURES)
    minor = read_annotation_file(directory / MINOR_FILE) if minor_features else None
    if minor is not None and minor.sentences != major.sentences:
        raise UsageError(f"{minor.path}: rows differ from {major.path}")
    return major, minor
