"""Charts as PNG files: matplotlib drawing into files only, imported where a chart is drawn (it is slow to import)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cola_hf.file_io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """matplotlib.pyplot, drawing into files only (no display needed); imported where a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Figure, path: str | Path) -> None:
    """A matplotlib figure as a PNG, then closed (a study draws hundreds: open figures would pile up)."""
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    pyplot().close(figure)
