"""Tables as GitHub markdown, for the reports a run and a study write (analysis.md, blimp.md, the card)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table: 4 significant digits, empty cells for missing values."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.astype(object).values]
    return "\n".join(lines) + "\n"
