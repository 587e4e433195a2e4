"""Console scripts: thin faces over the package's modules (`cola-predict`, `cola-compare`)."""

from __future__ import annotations


# --- cola-predict (Hub/sharing) -------------------------------------------------------------------------------
def predict_main(argv: list[str] | None = None) -> int:
    raise NotImplementedError


# --- cola-compare (tracking) ----------------------------------------------------------------------------------
def compare_main(argv: list[str] | None = None) -> int:
    raise NotImplementedError
