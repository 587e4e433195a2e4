"""Files, read and written the same way everywhere (nothing heavy imported).

Writes are atomic (a temporary file beside the target, then a rename), so a run killed mid-write never leaves a
half-written file that looks finished. Users' text files (sentences, predictions, annotations, GLUE's test file,
recipes, sweep files) are read as UTF-8 with or without a byte-order mark; whatever goes wrong is one line naming
the file (`UsageError`), and the line where there is one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cola_hf.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd


# --- writing -------------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes files private; outputs are meant to be shared
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


# --- reading -------------------------------------------------------------------------------------------------
def read_text(path: str | Path, option: str | None = None) -> str:
    """The file's text; `option` (e.g. '--input') is named in the error, so the user knows which flag to fix."""
    where = f" ({option})" if option else ""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror}){where}") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text{where}") from err


def read_tsv(path: str | Path, option: str | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A tab-separated file with a header: (header fields, [(line number, fields)] of its non-blank lines).

    No quoting, as in the CoLA files: sentences hold quote characters. Each reader checks its own columns.
    """
    lines = [line.rstrip("\r") for line in read_text(path, option).split("\n")]
    rows = [(number, line.split("\t")) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    return lines[0].split("\t"), rows


def dataclass_from_json(kind: Any, value: Any) -> Any:
    """Rebuild a value of type `kind` (dataclass, dict[str, X], list[X], X | None) from its JSON form.

    Keys `kind` does not know (a newer writer's) are left out, and missing ones take their defaults, so a reader
    never fails on a file one version apart.
    """
    if value is None:
        return None
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        fields = dataclasses.fields(kind)
        return kind(**{f.name: dataclass_from_json(hints[f.name], value[f.name]) for f in fields if f.name in value})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return dataclass_from_json(next(arg for arg in args if arg is not type(None)), value)
    if origin is dict:
        return {key: dataclass_from_json(args[1], item) for key, item in value.items()}
    if origin is list:
        return [dataclass_from_json(args[0], item) for item in value]
    return value


class JsonRecord:
    """A dataclass kept as an indented JSON file and read back typed (analysis.json, blimp.json); a file that does
    not parse is one line naming it."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str) -> Any:
        return dataclass_from_json(cls, json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Any:
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise UsageError(f"{path}: cannot read ({type(err).__name__}: {err})") from err


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of `what` (a recipe, a sweep file) at `path`."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"{path}: cannot read {what} ({err.strerror})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from err
