"""BLiMP's minimal pairs: found, checked line by line, read, and tokenized as sentences.

BLiMP (Warstadt et al. 2020, "BLiMP: The Benchmark of Linguistic Minimal Pairs for English", TACL 8:377-392;
CC-BY 4.0) is 67 paradigms of 1,000 pairs, one `<UID>.jsonl` file each: an acceptable and an unacceptable
sentence that differ in one point of grammar. Sources: the authors' zip (downloaded once and cached by
`datasets`), a local copy of it, or a directory of the .jsonl files. Knows nothing of models: a source in, a
`datasets.Dataset` out, or a `BlimpDataError` whose one-line message names the file and the line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from datasets.fingerprint import Hasher

from cola_hf.data.cola import tokenizer_fingerprint
from cola_hf.data.sources import download, is_url, local_root
from cola_hf.errors import BlimpDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

HOW_TO_PROVIDE = "--blimp_source path/to/BLiMP.zip"
EXPECTED = "the BLiMP zip's URL, a local BLiMP.zip, a directory of its <UID>.jsonl files, or none"
REQUIRED_FIELDS = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID")
# The release spells one field two ways; reading it one way keeps a grouping by field from splitting in two.
FIELD_SPELLINGS = {"syntax/semantics": "syntax_semantics"}
PAIR_FEATURES = datasets.Features(
    {
        "UID": datasets.Value("string"),
        "pairID": datasets.Value("string"),
        "linguistics_term": datasets.Value("string"),
        "field": datasets.Value("string"),
        "sentence_good": datasets.Value("string"),
        "sentence_bad": datasets.Value("string"),
    }
)
# A pair's two sentences are rows 2i (acceptable) and 2i + 1 (unacceptable) of tokenize_blimp's dataset.
GOOD, BAD = 1, 0


def skipped(source: str | None) -> bool:
    """`--blimp_source none`: no BLiMP in this run."""
    return source is None or source.strip().lower() == "none"


def blimp_root(source: str, cache_dir: str | None = None) -> Path | None:
    """The directory the source unpacks to; None (with one log line) when the URL cannot be fetched.

    A local path that is wrong raises: that is a mistake to fix. A download that fails (offline) leaves the
    run to go on without BLiMP.
    """
    if is_url(source):
        try:
            # The 2020 release does not change: once downloaded, the cached copy serves offline too.
            return download(source, cache_dir, check_for_updates=False)
        except (OSError, ConnectionError) as err:
            logger.warning(
                "BLiMP skipped: cannot download %s (%s); offline, pass %s", source, type(err).__name__, HOW_TO_PROVIDE
            )
            return None
    if "://" in source:
        raise BlimpDataError(f"{source}: unknown --blimp_source; expected {EXPECTED}")
    return local_root(Path(source).expanduser(), option="--blimp_source", expected=EXPECTED, error=BlimpDataError)


def paradigm_files(root: Path, source: str) -> list[Path]:
    """Every paradigm's .jsonl under `root`, by UID; macOS's __MACOSX/ and dot files (.DS_Store, ._x) left out."""
    files = sorted(
        (
            path
            for path in root.rglob("*.jsonl")
            if "__MACOSX" not in path.parts and not any(part.startswith(".") for part in path.relative_to(root).parts)
        ),
        key=lambda path: (path.stem, str(path)),
    )
    if not files:
        raise BlimpDataError(f"{source}: no BLiMP paradigm files (data/<UID>.jsonl) in it (--blimp_source)")
    for first, second in zip(files, files[1:], strict=False):
        if first.stem == second.stem:
            raise BlimpDataError(f"{second}: paradigm {second.stem} is also {first}")
    return files


def check_paradigm(path: Path) -> tuple[int, str]:
    """Check one paradigm file line by line; return its number of pairs and sha256, or raise naming file and line."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as err:
        raise BlimpDataError(f"{path}: cannot read ({err.strerror})") from err
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise BlimpDataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x})") from err
    first: tuple[int, dict] | None = None
    pair_lines: dict[str, int] = {}
    for number, pair in _pairs(path, text):
        missing = [name for name in REQUIRED_FIELDS if name not in pair]
        if missing:
            raise BlimpDataError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
        for name in ("sentence_good", "sentence_bad"):
            if not isinstance(pair[name], str) or not pair[name].strip():
                raise BlimpDataError(f"{path}:{number}: {name} must be a non-empty string")
        if first is None:
            first = number, pair
        for name in ("UID", "linguistics_term"):  # one paradigm per file, in one phenomenon
            if pair[name] != first[1][name]:
                raise BlimpDataError(
                    f"{path}:{number}: {name} {pair[name]!r}, but line {first[0]} has {first[1][name]!r}"
                )
        pair_id = str(pair["pairID"])
        if pair_id in pair_lines:
            raise BlimpDataError(f"{path}:{number}: pairID {pair_id} is also on line {pair_lines[pair_id]}")
        pair_lines[pair_id] = number
    if first is None:
        raise BlimpDataError(f"{path}: no pairs")
    return len(pair_lines), hashlib.sha256(raw).hexdigest()


def _pairs(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for every non-blank line."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as err:
            raise BlimpDataError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(pair, dict):
            raise BlimpDataError(f"{path}:{number}: expected a JSON object, found {type(pair).__name__}")
        yield number, pair


def _generate_pairs(files: list[str]) -> Iterator[dict[str, str]]:
    for file in files:
        path = Path(file)
        for _number, pair in _pairs(path, path.read_text(encoding="utf-8-sig")):
            yield {
                "UID": pair["UID"],
                "pairID": str(pair["pairID"]),
                "linguistics_term": pair["linguistics_term"],
                "field": FIELD_SPELLINGS.get(pair["field"], pair["field"]),
                "sentence_good": pair["sentence_good"],
                "sentence_bad": pair["sentence_bad"],
            }


def check_blimp(source: str | None, cache_dir: str | None = None) -> list[Path] | None:
    """Every paradigm file of the source, each checked; None when the source is `none` or cannot be downloaded.

    A run calls this before training so that a wrong local source fails at once, not after hours.
    """
    checked = _checked_paradigms(source, cache_dir)
    return None if checked is None else list(checked)


def _checked_paradigms(source: str | None, cache_dir: str | None) -> dict[Path, tuple[int, str]] | None:
    """Each paradigm file of the source with its check (pairs, sha256); None when `none` or not at hand."""
    if skipped(source):
        return None
    root = blimp_root(source, cache_dir)
    if root is None:
        return None
    return {path: check_paradigm(path) for path in paradigm_files(root, source)}


def read_blimp(source: str | None, cache_dir: str | None = None) -> datasets.Dataset | None:
    """All pairs (columns of PAIR_FEATURES), paradigms by UID, pairs in file order; None when not at hand.

    Each file is checked first (a bad line raises naming it); the pairs are then kept in datasets' cache,
    keyed by the files' contents, so a later run reads Arrow instead of JSON and tokenize_blimp's cache holds.
    """
    checked = _checked_paradigms(source, cache_dir)
    if checked is None:
        return None
    files, checks = list(checked), list(checked.values())
    pairs = datasets.Dataset.from_generator(
        _generate_pairs,
        features=PAIR_FEATURES,
        gen_kwargs={"files": [str(path) for path in files]},
        cache_dir=cache_dir,
        # By content, not by path: the same release anywhere hits the cache, a changed file misses it.
        fingerprint=Hasher.hash([[digest for _count, digest in checks], PAIR_FEATURES.to_dict(), _GENERATOR_CODE]),
    )
    assert len(pairs) == sum(count for count, _digest in checks), f"{source}: read {len(pairs)} pairs"
    logger.info("BLiMP: %d pairs in %d paradigms from %s", len(pairs), len(files), source)
    return pairs


_GENERATOR_CODE = Hasher.hash([_generate_pairs.__code__, _pairs.__code__, FIELD_SPELLINGS])


def tokenize_blimp(
    pairs: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int = 64
) -> datasets.Dataset:
    """Every pair's two sentences, tokenized once (cached by datasets): rows 2i (acceptable) and 2i + 1.

    Columns: `pair` (the row in `pairs`), `label` (1 acceptable, 0 not), `input_ids`, `length`. Single
    sentences need no attention mask (the scorer builds it from `length`) and no token type ids (all zero).
    """
    tokenized = pairs.map(
        _encode_pairs,
        batched=True,
        with_indices=True,
        remove_columns=pairs.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_seq_length},
        # datasets would fingerprint the call by pickling the tokenizer; the same inputs, hashed, are enough.
        new_fingerprint=Hasher.hash(
            [pairs._fingerprint, tokenizer_fingerprint(tokenizer), max_seq_length, _encode_pairs.__code__]
        ),
        desc="Tokenizing BLiMP",
    )
    lengths = tokenized.with_format("numpy", columns=["length"])[:]["length"]
    logger.info(
        "BLiMP: %d sentences, longest %d tokens with [CLS]/[SEP] (limit %d; %d reach it)",
        len(tokenized),
        lengths.max(),
        max_seq_length,
        (lengths >= max_seq_length).sum(),
    )
    return tokenized


def _encode_pairs(
    batch: dict[str, list], indices: list[int], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list]:
    pairs = zip(batch["sentence_good"], batch["sentence_bad"], strict=True)
    sentences = [sentence for pair in pairs for sentence in pair]
    encoded = tokenizer(
        sentences, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )
    return {
        "pair": [index for index in indices for _ in (GOOD, BAD)],
        "label": [GOOD, BAD] * len(indices),
        "input_ids": encoded["input_ids"],
        "length": [len(ids) for ids in encoded["input_ids"]],
    }
