"""CoLA from its zip, a local copy or a directory of raw TSVs, to tokenized `datasets` splits.

Knows nothing of training, W&B or the Hub: sources in, `DatasetDict` out, or a `ColaDataError` whose one-line
message names the file and the line.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer

from cola_hf.data.sources import download, is_url, local_root
from cola_hf.errors import ColaDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

COLUMNS = ("sentence_source", "label", "label_notes", "sentence")
FEATURES = datasets.Features(
    {
        "sentence_source": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]),
        "label_notes": datasets.Value("string"),
        "sentence": datasets.Value("string"),
    }
)
RAW_FILES = {
    "in_domain_train": "in_domain_train.tsv",
    "in_domain_dev": "in_domain_dev.tsv",
    "out_of_domain_dev": "out_of_domain_dev.tsv",
}


def find_raw_dir(source: str, cache_dir: str | None = None) -> Path:
    """Return the directory holding the three raw TSVs, downloading and extracting the zip when needed."""
    if is_url(source):
        try:
            root = download(source, cache_dir)
        except (OSError, ConnectionError) as err:
            raise ColaDataError(
                f"{source}: download failed ({type(err).__name__}); without internet pass a local copy: "
                "--cola_source path/to/cola_public_1.1.zip"
            ) from err
    else:
        root = local_root(Path(source).expanduser())
    try:
        # The files missing from each place the TSVs may be; the place with the fewest is the one meant.
        missing = {
            place: [name for name in RAW_FILES.values() if not (place / name).is_file()]
            for place in (root, root / "cola_public" / "raw", root / "raw")
        }
    except PermissionError as err:  # a directory on the way that we may not look into
        raise ColaDataError(f"{Path(err.filename).parent}: cannot list the directory ({err.strerror})") from err
    closest = min(missing, key=lambda place: len(missing[place]))
    if missing[closest]:
        lacking = missing[closest]
        found = "found none of them" if len(lacking) == len(RAW_FILES) else f"missing {', '.join(lacking)}"
        raise ColaDataError(
            f"{source}: expected {', '.join(RAW_FILES.values())} at its top level, under cola_public/raw/ "
            f"or under raw/; {found}"
        )
    return closest


def validate_tsv(path: Path) -> tuple[int, str]:
    """Check a raw CoLA TSV line by line; return its number of rows and sha256, or raise naming file and line.

    Accepts what real files contain: CRLF line endings, a UTF-8 byte-order mark, quotes and apostrophes
    inside sentences, blank trailing lines.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ColaDataError(f"{path}: cannot read ({err.strerror})") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ColaDataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x})") from err
    rows = 0
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(COLUMNS):
            raise ColaDataError(
                f"{path}:{number}: expected 4 tab-separated columns (source, label, notes, sentence), "
                f"found {len(fields)}"
            )
        if fields[1] not in ("0", "1"):
            raise ColaDataError(f"{path}:{number}: label must be 0 or 1, found {fields[1]!r}")
        if not fields[3].strip():
            raise ColaDataError(f"{path}:{number}: empty sentence")
        rows += 1
    if rows == 0:
        raise ColaDataError(f"{path}: no sentences")
    return rows, hashlib.sha256(raw).hexdigest()


def read_cola_tsv(path: str | Path) -> datasets.Dataset:
    """Load one raw CoLA TSV (4 columns, no header, no quoting) after validating it.

    The file's sha256 is kept in the dataset's `info.download_checksums` (see `file_hashes`).
    """
    path = Path(path)
    rows, sha256 = validate_tsv(path)
    dataset = datasets.load_dataset(
        "csv",
        data_files=str(path),
        split="train",
        delimiter="\t",
        quoting=csv.QUOTE_NONE,  # sentences contain quote characters that are not CSV quoting
        column_names=list(COLUMNS),
        keep_default_na=False,  # an empty notes column is "", and a sentence "NA" stays text
        encoding="utf-8-sig",
        features=FEATURES,
    )
    assert len(dataset) == rows, f"{path}: read {len(dataset)} rows, validated {rows}"
    dataset.info.download_checksums = {path.name: {"num_bytes": path.stat().st_size, "checksum": sha256}}
    return dataset


def read_cola(source: str, cache_dir: str | None = None) -> datasets.DatasetDict:
    """The raw files (keys of RAW_FILES), each validated and read whole."""
    raw_dir = find_raw_dir(source, cache_dir)
    return datasets.DatasetDict({split: read_cola_tsv(raw_dir / name) for split, name in RAW_FILES.items()})


def file_hashes(files: datasets.DatasetDict) -> dict[str, str]:
    """sha256 of every raw TSV behind `files` (read_cola's, raw, tokenized or split), by file name."""
    return {
        name: checksum["checksum"]
        for dataset in files.values()
        for name, checksum in (dataset.info.download_checksums or {}).items()
    }


def split_cola(files: datasets.DatasetDict, validation_fraction: float = 0.1, seed: int = 42) -> datasets.DatasetDict:
    """Splits: train/validation (in_domain_train split with the seed), and the test sets (results.TEST_SPLITS).

    `files` are read_cola's, raw or tokenized. Tokenize them before splitting: a split is a view whose rows
    datasets gathers one at a time, which makes tokenizing it twice as slow, and the cache of a whole file
    then serves every seed.
    """
    if not 0 < validation_fraction < 1:
        raise ColaDataError(f"--validation_fraction must be between 0 and 1, found {validation_fraction}")
    held_out = files["in_domain_train"].train_test_split(test_size=validation_fraction, seed=seed)
    return datasets.DatasetDict(
        train=held_out["train"],
        validation=held_out["test"],
        out_of_domain_dev=files["out_of_domain_dev"],
        in_domain_dev=files["in_domain_dev"],
        glue_dev=datasets.concatenate_datasets([files["in_domain_dev"], files["out_of_domain_dev"]]),
    )


def tokenize_cola(
    raw: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 64,
    pad_to_max_length: bool = False,
) -> datasets.DatasetDict:
    """Add input_ids (and token_type_ids) with the tokenizer, in batches, cached by datasets.

    With dynamic padding every row is unpadded, so its attention mask would be all ones: the collator builds
    it when it pads the batch, and tokenizing without it takes half the time. With --pad_to_max_length the
    mask marks the padding and is kept. The raw columns stay (the predictions files hold them beside each
    prediction); the Trainer drops what the model does not take. `length` lets the length-grouped sampler skip
    re-measuring every example.
    """
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    tokenized = datasets.DatasetDict(
        {
            name: split.map(
                _encode,
                batched=True,
                fn_kwargs={"tokenizer": tokenizer, "max_length": max_seq_length, "pad": pad_to_max_length},
                # datasets would fingerprint the call by pickling the tokenizer, for each split: that took
                # longer than tokenizing CoLA. The same inputs, hashed directly, give the same cache.
                new_fingerprint=Hasher.hash(
                    [split._fingerprint, tokenizer_hash, max_seq_length, pad_to_max_length, _encode.__code__]
                ),
                desc=f"Tokenizing {name}",
            )
            for name, split in raw.items()
        }
    )
    # glue_dev repeats the two dev sets, so it is left out of the count.
    lengths = np.concatenate(
        [
            split.with_format("numpy", columns=["length"])[:]["length"]
            for name, split in tokenized.items()
            if name != "glue_dev"
        ]
    )
    logger.info(
        "Longest tokenized sentence: %d tokens with [CLS]/[SEP] (limit %d; %d sentences reach it)",
        lengths.max(),
        max_seq_length,
        (lengths >= max_seq_length).sum(),
    )
    return tokenized


def _encode(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, pad: bool) -> dict:
    encoded = tokenizer(
        batch["sentence"],
        truncation=True,
        max_length=max_length,
        padding="max_length" if pad else False,
        return_attention_mask=pad,
    )
    if pad:
        encoded["length"] = [sum(mask) for mask in encoded["attention_mask"]]
    else:
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
    return encoded


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the tokenizer's output: its Rust pipeline, as JSON, when it has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a pure-Python tokenizer: let datasets pickle it
        return Hasher.hash(tokenizer)
    # Every call sets truncation and padding from its own arguments, which the fingerprint covers.
    pipeline = Tokenizer.from_str(backend.to_str())
    pipeline.no_truncation()
    pipeline.no_padding()
    settings = [type(tokenizer).__name__, tokenizer.truncation_side, tokenizer.padding_side, tokenizer.pad_token_id]
    return Hasher.hash([pipeline.to_str(), settings])
