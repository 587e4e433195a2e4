"""Users' text files (sentences, predictions, annotations, GLUE's test file, recipes, sweep files), read the
same way everywhere: UTF-8 with or without a byte-order mark; whatever goes wrong is one line naming the file
(`UsageError`), and for YAML the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cola_hf.errors import UsageError


def read_text(path: str | Path, option: str | None = None) -> str:
    """The file's text; `option` (e.g. '--input') is named in the error, so the user knows which flag to fix."""
    where = f" ({option})" if option else ""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror}){where}") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text{where}") from err


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
