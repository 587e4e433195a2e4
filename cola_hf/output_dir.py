"""The output-directory rule, for single runs and every run of a study: finished? resumable? what to refuse?

A run is finished when its results.json exists (written last). An unfinished run may hold checkpoint-N
directories; a complete one has a whole trainer_state.json (the Trainer writes it last).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from cola_hf.errors import UsageError
from cola_hf.reporting import FAILED_MARKER
from cola_hf.results import RESULTS_FILE

logger = logging.getLogger(__name__)


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / RESULTS_FILE).is_file()


def prepare_output_dir(output_dir: str | Path, training_args: TrainingArguments) -> str | None:
    """Refuse to clobber a finished run; return the checkpoint to resume from (None: start fresh)."""
    output_dir = Path(output_dir)
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    resume = getattr(training_args, "resume", False)
    if resume:
        checkpoint = latest_complete_checkpoint(output_dir, training_args.should_save) if checkpoint else None
        if checkpoint is None:
            raise UsageError(f"{output_dir}: --resume given, but it holds no complete checkpoint-* directory")
    elif is_finished(output_dir) and not training_args.overwrite_output_dir:
        raise UsageError(f"{output_dir}: holds a finished run; pass --overwrite_output_dir or another --output_dir")
    elif checkpoint is not None and training_args.do_train and not training_args.overwrite_output_dir:
        raise UsageError(
            f"{output_dir}: holds checkpoints of an unfinished run; pass --resume or --overwrite_output_dir"
        )
    if training_args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in (RESULTS_FILE, "README.md", FAILED_MARKER):
            (output_dir / stale).unlink(missing_ok=True)
    return checkpoint if resume else None


def latest_complete_checkpoint(output_dir: str | Path, remove_incomplete: bool = False) -> str | None:
    """The newest checkpoint-N whose trainer_state.json (the Trainer writes it last) is whole, else None.

    A run killed while saving leaves a newer checkpoint without it, or with half of it. The Trainer deletes
    older checkpoints only once a new one is complete, so a complete one is still there. With
    `remove_incomplete` (the main process) the incomplete ones are removed, or checkpoint rotation would later
    keep them and delete the good one.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    numbered = [
        (int(match[1]), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name))
    ]
    for _, path in sorted(numbered, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            logger.warning("%s is incomplete (the run stopped while saving it); resuming from an earlier one", path)
            if remove_incomplete:
                shutil.rmtree(path)
    return None
