"""The output-directory rule, for single runs and every run of a study: finished? resumable? in use?

- A run is finished when its results.json exists (written last). The same command again refuses it unless
  --overwrite_output_dir.
- An unfinished run with a complete checkpoint (a whole trainer_state.json, the Trainer's last write, and no
  `checkpoint-is-incomplete.txt` marker) continues from the newest one: the same command resumes a run that
  was preempted or killed. With none, the run starts fresh. --resume insists on a checkpoint.
- A checkpoint continues only under the options it was trained with (`RunOptions.trajectory`, recorded in
  `.cola.run_options.json` when the run starts): other ones are refused, naming what changed.
- ... and in the layout that saved it (processes, per-device batch): each process continues its own random state,
  which draws its dropout masks micro-batch by micro-batch, and no mapping of N states onto M processes, or of
  masks onto other micro-batches, continues the run that was stopped; another layout is refused.
- A run of several processes needs the same directory on every node (`check_shared_output_dir`): each process
  saves its own random state into each checkpoint, and each decides from the directory whether to resume.
- One run at a time per directory: a second one stops at once, naming the holder (`hold_output_dir`).
- An evaluation-only run never writes into a training run's directory (it would finish a run it did not train).
- --overwrite_output_dir clears what the previous run left (`PREVIOUS_RUN_FILES`) before anything is written.
- A directory refused (`Refused`) is left as it was: every check comes before anything is removed or
  written, and no RUN_FAILED goes into it, so a finished run's directory never says its run failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import torch.distributed
from transformers import TrainingArguments

from cola_hf.errors import Refused, UsageError
from cola_hf.file_io import write_json, write_text
from cola_hf.run_files import (
    FAILED_MARKER,
    HOLDER_FILE,
    LOCK_FILE,
    PREVIOUS_RUN_FILES,
    RESULTS_FILE,
    RUN_OPTIONS_FILE,
    RUN_OUTCOME_FILES,
    SHARED_DIR_TOKEN,
    TRAINER_STATE,
)

logger = logging.getLogger(__name__)

INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"  # transformers' own marker of a checkpoint being written


def check_output_dir_path(output_dir: str | Path) -> None:
    """An --output_dir that is, or lies under, a file: one line naming it, before anything runs."""
    path = Path(output_dir)
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                under = "" if place == path else f" ({place} is a file)"
                raise UsageError(f"--output_dir {output_dir}: not a directory{under}; pass a directory's path")
            return


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / RESULTS_FILE).is_file()


def mark_failed(output_dir: str | Path, message: str, rank: int = 0, run_started: float | None = None) -> None:
    """Leave the marker that says why the run in `output_dir` failed.

    In a run of several processes the first failure is the cause and the others follow from it (a peer that
    left a collective): a process other than the main one writes the marker when it fails, naming itself, and
    the main process keeps such a marker written since `run_started` (a time.time()) instead of its own line.
    """
    marker = Path(output_dir) / FAILED_MARKER
    if rank != 0:
        write_text(marker, f"process {rank}: {message}\n")
        return
    if run_started is not None and failed_since(output_dir, run_started):
        return
    write_text(marker, message + "\n")


def failed_since(output_dir: str | Path, run_started: float) -> str | None:
    """The failure another process of this run recorded (written since `run_started`), else None."""
    marker = Path(output_dir) / FAILED_MARKER
    try:
        if marker.stat().st_mtime < run_started:
            return None
        line = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return line if line.startswith("process ") else None


def prepare_output_dir(
    output_dir: str | Path, training_args: TrainingArguments, trajectory: dict[str, Any] | None = None
) -> str | None:
    """Apply the rule above; return the checkpoint to resume from (None: start fresh).

    `trajectory`: the options a checkpoint must have been trained with to be continued (recorded for the next
    time when given)."""
    output_dir = Path(output_dir)
    overwrite, resume = training_args.overwrite_output_dir, getattr(training_args, "resume", False)
    checkpoint = newest_complete = None
    if resume or not overwrite:
        # Incomplete newer ones are removed only once nothing is refused.
        checkpoint = newest_complete = latest_complete_checkpoint(output_dir)
    if resume and checkpoint is None:
        raise Refused(f"{output_dir}: --resume given, but it holds no complete checkpoint-* directory")
    if is_finished(output_dir) and not (resume or overwrite):
        raise Refused(f"{output_dir}: holds a finished run; pass --overwrite_output_dir or another --output_dir")
    if not training_args.do_train:
        check_not_a_training_run(output_dir)
        checkpoint = None
    if checkpoint is not None:
        if trajectory is not None:
            check_same_trajectory(output_dir, trajectory)
        check_same_layout(Path(checkpoint), training_args.world_size, training_args.per_device_train_batch_size)
        logger.info("%s holds an unfinished run: continuing from %s", output_dir, Path(checkpoint).name)
    if training_args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume or not overwrite:
            remove_incomplete_checkpoints(output_dir, newest_complete)
        if overwrite and not resume:
            clear_previous_run(output_dir)
        for stale in RUN_OUTCOME_FILES:
            (output_dir / stale).unlink(missing_ok=True)
        if trajectory is not None:
            write_json(output_dir / RUN_OPTIONS_FILE, trajectory)
    return checkpoint


def check_shared_output_dir(output_dir: str | Path, training_args: TrainingArguments) -> None:
    """Refuse, on every process at once, a run whose processes do not all see the main process's output directory.

    Nodes with node-local output directories would each keep their processes' rng_state files and decide alone
    whether to resume: node 1 sees no checkpoint, node 0 sees one, and the processes hang in their first
    collective. The main process writes a fresh token, every process reads it back, and all of them compare.
    """
    if training_args.world_size <= 1 or not torch.distributed.is_initialized():
        return
    token_file = Path(output_dir) / SHARED_DIR_TOKEN
    token = [None]
    if training_args.process_index == 0:
        token = [uuid.uuid4().hex]
        write_text(token_file, token[0])
    torch.distributed.broadcast_object_list(token, src=0)  # after the write: the others read it after this
    try:
        seen = token_file.read_text(encoding="utf-8")
    except OSError:
        seen = None
    everyone: list[Any] = [None] * training_args.world_size
    torch.distributed.all_gather_object(everyone, (seen == token[0], socket.gethostname()))
    if training_args.process_index == 0:  # every process has read it: a finished run's directory keeps no token
        token_file.unlink(missing_ok=True)
    elsewhere = [f"{rank} (on {host})" for rank, (same, host) in enumerate(everyone) if not same]
    if elsewhere:
        raise Refused(
            f"{output_dir}: not the same directory on every node: process{'es' if len(elsewhere) > 1 else ''} "
            f"{', '.join(elsewhere)} do not see what the main process wrote there; give every node one shared "
            "directory (a network filesystem) as --output_dir",
            on_every_process=True,
        )


def check_not_a_training_run(output_dir: Path) -> None:
    """An evaluation-only run writes its own directory: in a training run's, its results.json would mark that run
    finished (and publish its weights with another model's test results)."""
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint is None and not (output_dir / TRAINER_STATE).is_file():
        return
    if is_finished(output_dir):
        held = "a finished training run"
    else:
        held = f"an unfinished training run ({Path(checkpoint).name})" if checkpoint else "a training run"
    raise Refused(
        f"{output_dir}: holds {held}; an evaluation-only run (--do_train False) needs a directory of its own: "
        "pass another --output_dir"
    )


def clear_previous_run(output_dir: Path) -> None:
    """Remove every file of PREVIOUS_RUN_FILES from `output_dir`."""
    for pattern in PREVIOUS_RUN_FILES:
        for path in output_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def check_same_trajectory(output_dir: Path, trajectory: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint under options other than those it was trained with (one line each)."""
    try:
        recorded = json.loads((output_dir / RUN_OPTIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # written by an older version, or lost: nothing to compare with
    changed = [
        f"{name} {recorded[name]} there, {value} now"
        for name, value in trajectory.items()
        if name in recorded and recorded[name] != value
    ]
    if changed:
        raise Refused(
            f"{output_dir}: holds an unfinished run with other options ({'; '.join(changed)}); give the same "
            "options to continue it, or --overwrite_output_dir to start over"
        )


def check_same_layout(checkpoint: Path, processes: int, per_device_batch: int) -> None:
    """Refuse to continue a checkpoint on another number of processes (its rng_state files say how many saved it)
    or with another per-device batch (trainer_state.json's); the global batch is checked with the trajectory."""
    states = [path.name for path in checkpoint.glob("rng_state*.pth")]
    if not states:
        return  # saved without random states (--save_only_model): nothing to continue exactly
    saved = 1 if states == ["rng_state.pth"] else len(states)
    if saved != processes:
        raise Refused(
            f"{checkpoint}: saved by {saved} process{'es' if saved > 1 else ''}, and this run has {processes}; "
            f"each process continues its own random state, so it continues exactly only on {saved}: launch "
            f"{saved}, or pass --overwrite_output_dir to start over"
        )
    try:
        saved_batch = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))["train_batch_size"]
    except (OSError, ValueError, KeyError):
        return
    if saved_batch is not None and saved_batch != per_device_batch:
        raise Refused(
            f"{checkpoint}: saved with a per-device batch of {saved_batch}, and this run's is {per_device_batch}; "
            "dropout masks are drawn per micro-batch, so it continues exactly only with the same: pass "
            f"--per_device_train_batch_size {saved_batch}, or --overwrite_output_dir to start over"
        )


@contextlib.contextmanager
def hold_output_dir(output_dir: str | Path, main_process: bool = True) -> Iterator[None]:
    """Hold the directory's lock for the run; if another run holds it, one line naming it (UsageError).

    An flock held by the operating system: a run killed in any way releases it, so a stale lock never blocks
    the next run. Only the main process takes it (the other processes of a run are the same run).
    """
    if not main_process:
        yield
        return
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(output_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = _holder(output_dir)
        raise Refused(f"{output_dir}: in use by another run ({holder}); wait for it or stop it") from None
    holder = output_dir / HOLDER_FILE
    holder.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}),
        encoding="utf-8",
    )
    try:
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def is_held(output_dir: str | Path) -> bool:
    """Whether a live run holds the directory (a killed run's lock is gone with it)."""
    lock = filelock.FileLock(Path(output_dir) / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


def _holder(output_dir: Path) -> str:
    try:
        holder = json.loads((output_dir / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N whose trainer_state.json (the Trainer writes it last) is whole, else None.

    A run killed while saving leaves a newer checkpoint without it, or with half of it. The Trainer deletes
    older checkpoints only once a new one is complete, so a complete one is still there.
    """
    for _, path in numbered_checkpoints(output_dir):
        try:
            json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
            if (path / INCOMPLETE_MARKER).exists():
                raise ValueError(INCOMPLETE_MARKER)
            return str(path)
        except (OSError, ValueError):
            logger.warning("%s is incomplete (the run stopped while saving it); resuming from an earlier one", path)
    return None


def numbered_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The checkpoint-N directories, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    numbered = [
        (int(match[1]), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name))
    ]
    return sorted(numbered, reverse=True)


def remove_incomplete_checkpoints(output_dir: Path, newest_complete: str | None) -> None:
    """Remove the checkpoints newer than the newest complete one (all, if none is): left as they are, checkpoint
    rotation would later keep them and delete the good one."""
    kept = int(Path(newest_complete).name.split("-")[1]) if newest_complete else -1
    for number, path in numbered_checkpoints(output_dir):
        if number > kept:
            shutil.rmtree(path)
