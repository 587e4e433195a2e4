"""Shared fixtures: a tiny random-initialised BERT with its own WordPiece vocabulary, synthetic CoLA and BLiMP files.

Nothing here touches the network: the WordPiece vocabulary is built on the fly with `tokenizers`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

# Launching the command lives in launching.py; REPO, SCRIPT and run_cola stay importable from here too.
from launching import REPO, SCRIPT, preserved_logging, run_cola, write_hooks  # noqa: F401

COLA_ZIP = os.environ.get("COLA_ZIP")
COLA_ANNOTATIONS_ZIP = os.environ.get("COLA_ANNOTATIONS_ZIP")
BLIMP_ZIP = os.environ.get("BLIMP_ZIP")

SUBJECTS = ["the cat", "a dog", "john", "mary", "the students", "every linguist", "she", "they"]
VERBS = ["saw", "liked", "read", "wrote about", "praised"]
OBJECTS = ["the book", "a paper", "the homework problem", "it", "the analysis", "them"]


def synthetic_rows(count: int, seed: int) -> list[tuple[str, int, str, str]]:
    """Sentences with a learnable rule: word order subject-verb-object is acceptable, a shuffle is not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
        label = rng.random() < 0.7
        if not label:
            rng.shuffle(words)
        notes = "" if label else "*"
        rows.append((f"src{rng.randrange(4)}", int(label), notes, " ".join(words) + "."))
    return rows


def write_tsv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("".join("\t".join(str(field) for field in row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_cola_dir(root: Path, train: int = 200, in_domain: int = 40, out_of_domain: int = 36) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_tsv(root / "in_domain_train.tsv", synthetic_rows(train, seed=1))
    write_tsv(root / "in_domain_dev.tsv", synthetic_rows(in_domain, seed=2))
    write_tsv(root / "out_of_domain_dev.tsv", synthetic_rows(out_of_domain, seed=3))
    return root


def verb_rule_rows(count: int, seed: int) -> list[tuple]:
    """CoLA-format rows whose label follows the verb ("saw": acceptable, "praised": not): a rule the tiny random
    BERT learns within an epoch at a high learning rate and not at all at a tiny one, so searches' trials differ."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = int(rng.random() < 0.6)
        verb = "saw" if label else "praised"
        rows.append(
            (
                f"src{rng.randrange(4)}",
                label,
                "" if label else "*",
                f"{rng.choice(SUBJECTS)} {verb} {rng.choice(OBJECTS)}.",
            )
        )
    return rows


@pytest.fixture(scope="session")
def verb_cola_dir(tmp_path_factory) -> Path:
    """Raw CoLA TSVs of the verb rule (train 200, in-domain dev 40, out-of-domain dev 36)."""
    root = tmp_path_factory.mktemp("verb-cola")
    write_tsv(root / "in_domain_train.tsv", verb_rule_rows(200, seed=1))
    write_tsv(root / "in_domain_dev.tsv", verb_rule_rows(40, seed=2))
    write_tsv(root / "out_of_domain_dev.tsv", verb_rule_rows(36, seed=3))
    return root


def error_line(stderr: str) -> str:
    """The one `cola: error:` line of a failed command, without that prefix; fails on a traceback or on more."""
    lines = [line for line in stderr.splitlines() if line.startswith("cola: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0].removeprefix("cola: error: ")


# How `make test` shares the suite between its two workers: tests/xdist_groups.py.
from xdist_groups import (  # noqa: E402, F401 (hooks: pytest finds them by name here)
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_configure_node,
    pytest_itemcollected,
    pytest_unconfigure,
    pytest_xdist_make_scheduler,
)


@pytest.fixture(autouse=True)
def restore_logging():
    """A run in this process configures logging (cola_hf.cli.train.configure_logging), and some tests turn
    loggers up: the next test starts from the logging this one had, as a new process would."""
    with preserved_logging():
        yield


@pytest.fixture(scope="session")
def cola_dir(tmp_path_factory) -> Path:
    """A directory of small synthetic raw CoLA TSVs (train 200, in-domain dev 40, out-of-domain dev 36)."""
    return write_cola_dir(tmp_path_factory.mktemp("cola") / "raw")


@pytest.fixture(scope="session")
def cola_zip() -> Path:
    if not COLA_ZIP or not Path(COLA_ZIP).is_file():
        pytest.skip("COLA_ZIP is not set to the CoLA 1.1 zip (../shared/data/cola_public_1.1.zip)")
    return Path(COLA_ZIP)


@pytest.fixture(scope="session")
def annotations_zip() -> Path:
    if not COLA_ANNOTATIONS_ZIP or not Path(COLA_ANNOTATIONS_ZIP).is_file():
        pytest.skip(
            "COLA_ANNOTATIONS_ZIP is not set to CoLA's grammatical annotations "
            "(../shared/data/CoLA_grammatical_annotations.zip)"
        )
    return Path(COLA_ANNOTATIONS_ZIP)


# --- synthetic BLiMP: real paradigm names, made-up sentences ------------------------------------------------------
# Real paradigm names with their data's linguistics_term and field (both spellings of syntax_semantics, and one
# s-selection paradigm, which the paper counts as argument_structure); one made-up paradigm the reference lacks.
BLIMP_PARADIGMS = {
    "anaphor_gender_agreement": ("anaphor_agreement", "morphology"),
    "animate_subject_passive": ("s-selection", "syntax_semantics"),
    "causative": ("argument_structure", "syntax"),
    "wh_island": ("island_effects", "syntax/semantics"),
    "made_up_paradigm": ("island_effects", "syntax"),
}
BLIMP_PAIRS = 30


def synthetic_pair(rng: random.Random) -> tuple[str, str]:
    """A BLiMP-like pair: a sentence in subject-verb-object order, and the same words shuffled."""
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(words) + ".", " ".join(shuffled) + "."


def paradigm_lines(uid: str, pairs: int = BLIMP_PAIRS, seed: int = 0) -> list[str]:
    term, field = BLIMP_PARADIGMS[uid]
    rng = random.Random(f"{uid}{seed}")
    lines = []
    for pair_id in range(pairs):
        good, bad = synthetic_pair(rng)
        record = {
            "sentence_good": good,
            "sentence_bad": bad,
            "field": field,
            "linguistics_term": term,
            "UID": uid,
            "simple_LM_method": True,
            "one_prefix_method": False,
            "two_prefix_method": False,
            "lexically_identical": False,
            "pairID": str(pair_id),
        }
        lines.append(json.dumps(record))
    return lines


def write_blimp_dir(root: Path, lines: dict[str, list[str]] | None = None) -> Path:
    """data/<UID>.jsonl for BLIMP_PARADIGMS (or the given lines), with the release's macOS litter beside them."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for uid, content in (lines or {uid: paradigm_lines(uid) for uid in BLIMP_PARADIGMS}).items():
        (data / f"{uid}.jsonl").write_text("\n".join(content) + "\n", encoding="utf-8")
    (data / ".DS_Store").write_bytes(b"\0Bud1\0")
    (root / "__MACOSX" / "data").mkdir(parents=True, exist_ok=True)
    (root / "__MACOSX" / "data" / "._causative.jsonl").write_bytes(b"\0\x05\x16\x07 not json")
    return root


@pytest.fixture(scope="session")
def blimp_dir(tmp_path_factory) -> Path:
    """Synthetic BLiMP: 5 paradigms of 30 pairs, as the release lays them out (data/<UID>.jsonl)."""
    return write_blimp_dir(tmp_path_factory.mktemp("blimp"))


@pytest.fixture(scope="session")
def blimp_zip() -> Path:
    if not BLIMP_ZIP or not Path(BLIMP_ZIP).is_file():
        pytest.skip("BLIMP_ZIP is not set to BLiMP's release (../shared/data/BLiMP.zip)")
    return Path(BLIMP_ZIP)


def build_tiny_model(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [row[3] for row in synthetic_rows(500, seed=0)] + ["Our friends won't buy this analysis."]
    words = {word for text in corpus for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    # WordPieceTrainer breaks frequency ties in hash order, so its vocabulary changes from session to session;
    # whole words plus single characters (any unseen word splits into them) make the same vocabulary every time.
    characters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz.,'!?"))
    vocab = [*specials, *characters, *(f"##{c}" for c in characters), *sorted(words - set(characters))]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    config = BertConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "unacceptable", 1: "acceptable"},
        label2id={"unacceptable": 0, "acceptable": 1},
    )
    torch.manual_seed(0)  # the same initial weights in every session
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT classifier and its WordPiece tokenizer, saved with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def encoder_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT without its classifier head, like a pretrained checkpoint: each run draws a new head."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-encoder")
    BertForSequenceClassification.from_pretrained(tiny_model_dir).bert.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def signal_hooks(tmp_path_factory) -> Path:
    """launching.SIGNAL_HOOKS as a sitecustomize: pass it as `hooks=` to a launch, arm it with COLA_TEST_CUT or
    COLA_TEST_HOLD."""
    return write_hooks(tmp_path_factory.mktemp("signal-hooks"))


# --- a real PostgreSQL server ----------------------------------------------------------------------------------
POSTGRES_SCRIPT = REPO / "tests" / "postgres" / "start_local_postgres.sh"
POSTGRES_NOT_INSTALLED = 3  # start_local_postgres.sh's exit status when the server's binaries are missing


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The superuser URL of a running PostgreSQL: $COLA_TEST_POSTGRES_URL (.ci/run starts one), else the server
    tests/postgres/start_local_postgres.sh starts (idempotent). Skipped only where PostgreSQL is not installed."""
    url = os.environ.get("COLA_TEST_POSTGRES_URL")
    if url:
        return url
    started = subprocess.run(["bash", str(POSTGRES_SCRIPT)], capture_output=True, text=True, timeout=180)
    if started.returncode == POSTGRES_NOT_INSTALLED:
        pytest.skip(f"PostgreSQL is not installed here ({started.stderr.strip()})")
    if started.returncode != 0:
        raise RuntimeError(f"{POSTGRES_SCRIPT.name} failed:\n{started.stderr}")
    return started.stdout.strip().splitlines()[-1]


def postgres_admin(server_url: str):
    """An autocommit connection as the superuser (CREATE DATABASE cannot run inside a transaction)."""
    import psycopg

    return psycopg.connect(server_url, autocommit=True, connect_timeout=10)


@pytest.fixture
def postgres_database(postgres_server) -> str:
    """A fresh database for one test, owned by a fresh role whose password is random, as a SQLAlchemy URL
    (postgresql+psycopg://ROLE:PASSWORD@127.0.0.1:PORT/DB); both are dropped afterwards."""
    import secrets
    from urllib.parse import urlsplit

    name = f"cola_test_{secrets.token_hex(6)}"
    password = f"pw-{secrets.token_hex(12)}"
    with postgres_admin(postgres_server) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        admin.execute(f"CREATE DATABASE {name} OWNER {name}")
    server = urlsplit(postgres_server)
    yield f"postgresql+psycopg://{name}:{password}@{server.hostname}:{server.port}/{name}"
    with postgres_admin(postgres_server) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"DROP ROLE IF EXISTS {name}")
