"""Every exception the package raises on purpose, and `one_line`, which turns any error into one short line.

A user's mistake (a path, a file's contents, a flag) is a `UsageError`: one clear line and exit status 2,
not a traceback. A run that cannot go on is `RunFailed` (exit 1).
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a path, a file's contents, a flag). The message is the whole story."""

    exit_code = 2


class Refused(UsageError):
    """Bad input found before the run takes its output directory (a finished run there, another run holding it, a
    checkpoint of other options or layout, flags that conflict): the directory is left as it was, not even
    RUN_FAILED is written (the run it holds did not fail).

    `on_every_process`: every process of the run raised it at the same point, from a check they made together,
    so none of them is left in a collective."""

    def __init__(self, message: str, on_every_process: bool = False) -> None:
        super().__init__(message)
        self.on_every_process = on_every_process


class ColaDataError(UsageError):
    """A CoLA source that cannot be read; the message names the file and, where there is one, the line."""


class BlimpDataError(UsageError):
    """A BLiMP source that cannot be read; the message names the file and, where there is one, the line."""


class RunFailed(Exception):
    """A run that cannot go on (diverged training, say). One line says why; exit status 1."""

    exit_code = 1


class TrainingDiverged(RunFailed):
    """The training loss stopped being a finite number."""


class HubPushError(Exception):
    """The Hub could not be reached or refused the upload. One line says what was not uploaded."""

    exit_code = 1


def one_line(err: BaseException, limit: int = 200) -> str:
    """`Type: message` on one line, at most `limit` characters: servers answer with whole HTML pages."""
    message = " ".join(str(err).split())
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StoppedBySignal(Exception):
    """SIGTERM (preemption, a time limit) stopped the run after saving; the same command continues it.

    Exit status 75 (EX_TEMPFAIL: try again later), so a job script can tell it from a failure and requeue.
    """

    exit_code = 75

    def __init__(
        self, signal_name: str, step: int, max_steps: int, checkpoint: str | None = None, during: str | None = None
    ) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = during or f"at step {step} of {max_steps}"
        saved = f"; saved {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {signal_name} {where}{saved}; run the same command to continue")
