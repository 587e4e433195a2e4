"""The command's --help (and bad input, which stops at the same point) imports what parsing needs and nothing more:
not the Trainer, datasets, evaluate, pandas, matplotlib or W&B, which take seconds and are imported where a
run, a study or a chart uses them (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys

from launching import REPO, SCRIPT, offline_env

NOT_FOR_PARSING = ("transformers.trainer", "datasets", "evaluate", "pandas", "matplotlib", "wandb")


def test_help_imports_none_of_the_heavy_libraries_a_run_needs():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT), "--help"],
        capture_output=True, text=True, env=offline_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "--model_name_or_path" in result.stdout, result.stderr[-3000:]
    log = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in log}
    assert "cola_hf.config" in imported  # the log is the one expected
    assert sorted(imported & set(NOT_FOR_PARSING)) == []
