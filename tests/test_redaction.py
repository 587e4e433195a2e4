"""cola_hf.redaction: passwords in URL-valued options, tokens by flag, shape or environment, at any depth."""

from __future__ import annotations

import random
import string

import pytest

from cola_hf.redaction import MASK, is_secret_name, redact_argv, redact_options, redact_text

URL_FORMS = [
    "postgresql+psycopg://cola:{}@127.0.0.1:5432/cola",
    "postgresql://cola:{}@db.cluster.example/optuna?sslmode=require",
    "mysql+pymysql://root:{}@[::1]:3306/optuna",
    "https://reader:{}@data.example.org/cola_public_1.1.zip",
    "postgresql://:{}@localhost/db",
]


@pytest.mark.parametrize("form", URL_FORMS)
def test_a_urls_password_is_masked_and_the_rest_kept(form):
    assert redact_text(form.format("s3cr3t")) == form.format(MASK)


def test_any_password_sqlalchemy_accepts_is_masked_whole():
    """Passwords of every character a URL may carry unescaped there, '@', '/', ':', '?', '#' included."""
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "@/:?#%!$&()*+,;=~.-_[]"
    for _ in range(500):
        password = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        for form in URL_FORMS:
            url = form.format(password)
            assert redact_text(url) == form.format(MASK), url
            # ... and inside a sentence, quoted or not, once or twice.
            line = f"storage '{url}' failed; retrying {url} in 5 s"
            assert redact_text(line) == f"storage '{form.format(MASK)}' failed; retrying {form.format(MASK)} in 5 s"


def test_urls_without_a_password_are_left_alone():
    for text in (
        "postgresql://cola@127.0.0.1:5432/cola",
        "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip",
        "sqlite:////shared/study.db",
        "http://127.0.0.1:8080/path",
        "see https://sqlalche.me/e/21/e3q8 for details",
    ):
        assert redact_text(text) == text


def test_secret_parameters_of_a_url_or_a_connection_string():
    presigned = (
        "https://bucket.s3.amazonaws.com/cola.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20250101&X-Amz-Signature=0123abcd&X-Amz-Expires=3600"
    )
    assert redact_text(presigned) == (
        "https://bucket.s3.amazonaws.com/cola.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={MASK}&X-Amz-Signature={MASK}&X-Amz-Expires=3600"
    )
    assert redact_text("postgresql://cola@host/db?password=hunter22&sslmode=require") == (
        f"postgresql://cola@host/db?password={MASK}&sslmode=require"
    )
    assert redact_text("host=db.example user=cola password=hunter22 dbname=optuna") == (
        f"host=db.example user=cola password={MASK} dbname=optuna"
    )


def test_tokens_by_shape_and_by_environment(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("PGPASSWORD", "pg-password-from-env")
    monkeypatch.setenv("HF_TOKEN", "short")  # too short to mask safely: ordinary words would go too
    text = (
        "key 0123456789abcdef0123456789abcdef01234567, token hf_abcdefghijklmnopqrstuvwxyz0123, "
        "Authorization: Bearer eyJhbGciOi.payload.sig, pg-password-from-env, a short story"
    )
    assert redact_text(text) == f"key {MASK}, token {MASK}, Authorization: Bearer {MASK}, {MASK}, a short story"


def test_secret_flags_written_out_in_text():
    command = "python experiments/cola.py --hub_token abc123 --db-password=s3cret --pad_token [PAD] --seed 42"
    assert redact_text(command) == (
        f"python experiments/cola.py --hub_token {MASK} --db-password={MASK} --pad_token [PAD] --seed 42"
    )


def test_a_command_line_masks_secret_flags_and_urls():
    argv = [
        "experiments/cola.py", "--hub_token", "hf_abcdefghijklmnopqrstuvwxyz0123", "--hub_token=plain-secret",
        "--search_storage", "postgresql+psycopg://cola:pw@db/cola", "--cola_source=https://u:pw@host/cola.zip",
        "--wandb_api_key", "k", "--learning_rate", "2e-5",
    ]  # fmt: skip
    assert redact_argv(argv) == [
        "experiments/cola.py", "--hub_token", MASK, f"--hub_token={MASK}",
        "--search_storage", f"postgresql+psycopg://cola:{MASK}@db/cola", f"--cola_source=https://u:{MASK}@host/cola.zip",
        "--wandb_api_key", MASK, "--learning_rate", "2e-5",
    ]  # fmt: skip


def test_option_dictionaries_at_any_depth():
    options = {
        "search_storage": "postgresql://cola:pw@db/cola",
        "hub_token": "hf_abcdefghijklmnopqrstuvwxyz0123",
        "push_to_hub_token": None,  # none given: worth keeping as such
        "hub_private_token": "<HUB_PRIVATE_TOKEN>",  # transformers' placeholder: masked already
        "pad_token": "[PAD]",  # a tokenizer's special token is not a secret
        "learning_rate": 2e-5,
        "search": {"sweep": "wide.yaml", "sources": ["https://u:pw@host/a.zip", "/data/b.zip"], "n": 3},
        "pair": ("x", "https://u:pw@host"),
    }
    assert redact_options(options) == {
        "search_storage": f"postgresql://cola:{MASK}@db/cola",
        "hub_token": MASK,
        "push_to_hub_token": None,
        "hub_private_token": "<HUB_PRIVATE_TOKEN>",
        "pad_token": "[PAD]",
        "learning_rate": 2e-5,
        "search": {"sweep": "wide.yaml", "sources": [f"https://u:{MASK}@host/a.zip", "/data/b.zip"], "n": 3},
        "pair": ("x", f"https://u:{MASK}@host"),
    }
    assert options["hub_token"].startswith("hf_")  # a copy: the caller's options are untouched
    assert redact_options(redact_options(options)) == redact_options(options)  # idempotent


def test_which_names_hold_secrets():
    secret = ["hub_token", "--hub_token", "token", "password", "db-password", "wandb_api_key", "apikey", "secret"]
    plain = ["pad_token", "cls_token", "max_tokens", "tokenizer_name", "search_storage", "keyword", "secretary"]
    assert [name for name in secret if not is_secret_name(name)] == []
    assert [name for name in plain if is_secret_name(name)] == []
