"""Loading CoLA: the real release, synthetic files, odd-but-valid files and bad input."""

import zipfile

import pytest
from conftest import synthetic_rows, write_cola_dir, write_tsv

from cola_hf.data.cola import RAW_FILES, read_cola, read_cola_tsv, split_cola, tokenize_cola
from cola_hf.errors import ColaDataError


def test_real_release_splits_like_the_tutorial(cola_zip):
    splits = split_cola(read_cola(str(cola_zip)))
    sizes = {name: len(rows) for name, rows in splits.items()}
    assert sizes == {
        "train": 7695,
        "validation": 856,
        "out_of_domain_dev": 516,
        "in_domain_dev": 527,
        "glue_dev": 1043,
    }
    assert sum(splits["out_of_domain_dev"]["label"]) == 354  # the tutorial: "Positive samples: 354 of 516"


def test_split_is_reproducible_and_disjoint(cola_dir):
    first, again = split_cola(read_cola(str(cola_dir)), seed=7), split_cola(read_cola(str(cola_dir)), seed=7)
    assert first["validation"]["sentence"] == again["validation"]["sentence"]
    assert len(first["train"]) + len(first["validation"]) == 200
    other = split_cola(read_cola(str(cola_dir)), seed=8)
    assert other["validation"]["sentence"] != first["validation"]["sentence"]


def test_zip_and_directory_sources_agree(tmp_path, cola_dir):
    archive = tmp_path / "cola.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name in RAW_FILES.values():
            handle.write(cola_dir / name, f"cola_public/raw/{name}")
    from_zip, from_dir = split_cola(read_cola(str(archive))), split_cola(read_cola(str(cola_dir)))
    assert from_zip["glue_dev"]["sentence"] == from_dir["glue_dev"]["sentence"]


ROWS = [("gj04", 1, "", 'He said "hi" and left.'), ("cj99", 0, "*", "Mary's the book read."), ("x1", 1, "", "NA")]


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda text: text.replace("\n", "\r\n").encode(), id="crlf"),
        pytest.param(lambda text: b"\xef\xbb\xbf" + text.encode(), id="bom"),
        pytest.param(lambda text: (text + "\n\n\n").encode(), id="trailing-blank-lines"),
    ],
)
def test_odd_but_valid_files_load_like_the_clean_file(tmp_path, encode):
    clean = write_tsv(tmp_path / "clean.tsv", ROWS)
    odd = tmp_path / "odd.tsv"
    odd.write_bytes(encode(clean.read_text()))
    assert read_cola_tsv(odd).to_list() == read_cola_tsv(clean).to_list()
    assert read_cola_tsv(clean)["sentence"] == [row[3] for row in ROWS]  # quotes and "NA" kept as text


BAD_LINES = [
    ("wrong-column-count", b"gj04\t1\tHe left.\n", r"bad\.tsv:2: expected 4 tab-separated columns .* found 3"),
    ("label-not-0-or-1", b"gj04\t2\t\tHe left.\n", r"bad\.tsv:2: label must be 0 or 1, found '2'"),
    ("empty-sentence", b"gj04\t1\t\t  \n", r"bad\.tsv:2: empty sentence"),
    ("not-utf8", b"gj04\t1\t\tHe l\xe9ft.\n", r"bad\.tsv:2: not UTF-8"),
]


@pytest.mark.parametrize("second_line, message", [case[1:] for case in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_is_named_with_file_and_line(tmp_path, second_line, message):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"gj04\t1\t\tHe left.\n" + second_line)
    with pytest.raises(ColaDataError, match=message) as error:
        read_cola_tsv(bad)
    assert "\n" not in str(error.value)


def test_missing_source_and_incomplete_directory(tmp_path):
    with pytest.raises(ColaDataError, match=r"nowhere\.zip: no such file or directory"):
        read_cola(str(tmp_path / "nowhere.zip"))
    write_tsv(tmp_path / "in_domain_train.tsv", synthetic_rows(5, seed=0))
    with pytest.raises(ColaDataError, match="expected in_domain_train.tsv"):
        read_cola(str(tmp_path))
    not_a_zip = tmp_path / "cola.zip"
    not_a_zip.write_text("hello")
    with pytest.raises(ColaDataError, match="not a zip file"):
        read_cola(str(not_a_zip))


def test_tokenize_dynamic_and_fixed_padding(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    files = read_cola(str(write_cola_dir(tmp_path / "raw")))
    dynamic = split_cola(tokenize_cola(files, tokenizer, max_seq_length=8))
    fixed = split_cola(tokenize_cola(files, tokenizer, max_seq_length=16, pad_to_max_length=True))
    first = dynamic["train"][0]
    assert first["input_ids"][0] == tokenizer.cls_token_id and first["input_ids"][-1] == tokenizer.sep_token_id
    assert max(len(ids) for ids in dynamic["train"]["input_ids"]) <= 8
    assert {len(ids) for ids in fixed["train"]["input_ids"]} == {16}
    assert fixed["train"]["length"] == [sum(mask) for mask in fixed["train"]["attention_mask"]]
    assert dynamic["train"]["length"] == [len(ids) for ids in dynamic["train"]["input_ids"]]
    # Tokenized whole, then split: the same rows as splitting the raw file.
    assert dynamic["validation"]["sentence"] == split_cola(read_cola(str(tmp_path / "raw")))["validation"]["sentence"]

    # Dynamic rows carry no attention mask; the collator's batches equal the tokenizer's own padded batch.
    assert "attention_mask" not in dynamic["train"].column_names
    inputs = [name for name in tokenizer.model_input_names if name in dynamic["train"].column_names]
    batch = DataCollatorWithPadding(tokenizer)(list(dynamic["train"].select(range(32)).select_columns(inputs)))
    expected = tokenizer(
        dynamic["train"]["sentence"][:32], truncation=True, max_length=8, padding=True, return_tensors="pt"
    )
    assert set(batch) == set(expected) and "attention_mask" in batch
    for name in expected:
        assert batch[name].tolist() == expected[name].tolist(), name


def test_tokenization_is_cached_by_its_inputs(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    files = read_cola(str(write_cola_dir(tmp_path / "raw")))

    def cache_file(**kwargs) -> str:
        return tokenize_cola(files, tokenizer, **kwargs)["in_domain_train"].cache_files[0]["filename"]

    first = cache_file()
    # A call leaves truncation settings in the tokenizer's Rust state: they must not change the fingerprint.
    assert cache_file() == first
    assert cache_file(max_seq_length=8) != first
    assert cache_file(pad_to_max_length=True) != first
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["grammaticality"])  # a changed vocabulary: a new tokenization
    assert tokenize_cola(files, other)["in_domain_train"].cache_files[0]["filename"] != first
