"""One redaction for everything a run or a study records or publishes: no password and no token leaves.

A secret can come in through a URL-valued option (`--search_storage postgresql://user:PASSWORD@host/db`,
`--cola_source https://user:PASSWORD@host/cola.zip`, a presigned `...?X-Amz-Signature=...`), a flag named
like a secret (`--hub_token hf_...`), or an environment variable the libraries read (HF_TOKEN,
WANDB_API_KEY, PGPASSWORD). Each of those is replaced by `MASK`, wherever it appears: in text (the model
card's command line, log lines, error messages), in an argv list, and in option dictionaries (results.json's
config, the W&B config, best_params.yaml) at any depth. The rest of a URL stays, so the record still says
which server and database the study used.

Light on purpose: the standard library only, so that anything may import it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

MASK = "***"  # what SQLAlchemy's render_as_string(hide_password=True) writes too

# Environment variables whose values are secrets the libraries read (huggingface_hub, wandb, libpq).
SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "PGPASSWORD")
# Shorter values would mask ordinary words wherever they happen to occur.
_MIN_SECRET_LENGTH = 8

# scheme://user:PASSWORD@host: the password runs to the LAST '@' before the host, so that an unescaped '@',
# '/' or ':' in it (SQLAlchemy's URLs allow all but '@') is masked with the rest. Quotes and brackets end it:
# a URL quoted inside a longer text.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\"'<>]*:)(?P<secret>[^\s\"'<>]*)"
    r"(?=@[^\s@/?#\"'<>]*(?:[/?#\s\"'<>]|$))"
)
# A secret as a query parameter or a keyword of a libpq connection string: ?password=..., &token=...,
# X-Amz-Signature=... (presigned URLs), sig=... (Azure SAS), "password=... host=...".
_SECRET_PARAMETER = re.compile(
    r"(?P<head>(?:^|[?&;\s])(?:password|passwd|pwd|token|access_token|auth_token|api_key|apikey|secret|"
    r"client_secret|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"x-goog-signature|x-goog-credential)=)(?P<secret>[^&#\s]+)",
    re.IGNORECASE,
)
# A secret flag written out in a command line: `--hub_token VALUE`, `--db-password=VALUE`.
_SECRET_FLAG = re.compile(r"(?P<head>(?<![\w-])--(?P<name>[\w-]+)(?:=|\s+))(?P<secret>[^\s\"']+)")
# Tokens recognisable by their shape: Hugging Face user/org tokens, and HTTP bearer credentials.
_TOKEN_SHAPES = (
    re.compile(r"\bhf_[A-Za-z0-9]{16,}\b"),
    re.compile(r"(?<=\bBearer )[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE),
)
# An option or key that names a secret: hub_token, wandb_api_key, password, client_secret...; a tokenizer's
# special tokens (pad_token: [PAD]) are not secrets.
_SECRET_NAME = re.compile(r"(?:^|_)(?:token|password|passwd|secret|api_?key)$", re.IGNORECASE)
_NOT_SECRET_NAME = re.compile(r"^(?:pad|cls|sep|mask|unk|bos|eos|additional_special)_token$", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether an option or key named `name` holds a secret (hub_token yes, pad_token no)."""
    name = name.lstrip("-").replace("-", "_")
    return bool(_SECRET_NAME.search(name)) and not _NOT_SECRET_NAME.match(name)


def redact_text(text: str) -> str:
    """`text` with every password of a URL, secret parameter or flag, token and secret environment value masked."""
    for name in SECRET_ENVIRONMENT:
        secret = os.environ.get(name, "").strip()
        if len(secret) >= _MIN_SECRET_LENGTH:
            text = text.replace(secret, MASK)
    text = _SECRET_FLAG.sub(lambda match: match["head"] + MASK if is_secret_name(match["name"]) else match[0], text)
    text = _URL_PASSWORD.sub(lambda match: match["head"] + MASK, text)
    text = _SECRET_PARAMETER.sub(lambda match: match["head"] + MASK, text)
    for shape in _TOKEN_SHAPES:
        text = shape.sub(MASK, text)
    return text


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the value of every secret flag (`--hub_token X`, `--hub_token=X`) masked, and
    every argument redacted as text."""
    redacted: list[str] = []
    mask_next = False
    for argument in argv:
        if mask_next:
            redacted.append(MASK)
            mask_next = False
            continue
        flag, equals, _ = argument.partition("=")
        if flag.startswith("--") and is_secret_name(flag):
            if equals:
                redacted.append(f"{flag}={MASK}")
            else:
                redacted.append(argument)
                mask_next = True
            continue
        redacted.append(redact_text(argument))
    return redacted


def redact_options(options: Any) -> Any:
    """A copy of a (nested) mapping of options with secret-named values masked and every string redacted.

    Lists and tuples are walked too; other values are returned as they are. An empty or missing secret stays
    as it is (None says "no token given", which is worth keeping), and so does a placeholder ("<HUB_TOKEN>").
    """
    if isinstance(options, Mapping):
        return {
            key: MASK if _is_secret_value(str(key), value) else redact_options(value) for key, value in options.items()
        }
    if isinstance(options, list | tuple):
        return type(options)(redact_options(value) for value in options)
    if isinstance(options, str):
        return redact_text(options)
    return options


def _is_secret_value(name: str, value: Any) -> bool:
    """A value to mask for its name: given, and not already a placeholder (TrainingArguments.to_dict writes
    hub_token as "<HUB_TOKEN>")."""
    if not value or not is_secret_name(name):
        return False
    return not (isinstance(value, str) and value.startswith("<") and value.endswith(">"))


class RedactingFilter(logging.Filter):
    """Masks secrets in every record a handler writes, its traceback included (`install_on`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


def install_on(*loggers: logging.Logger) -> None:
    """Redact what the handlers of `loggers` write. On handlers, not loggers: a logger's own filters do not see
    the records its children pass up to its handlers."""
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
                handler.addFilter(RedactingFilter())
