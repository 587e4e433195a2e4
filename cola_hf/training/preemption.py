"""Runs that survive a cluster: SIGTERM saves a checkpoint and stops the run; the same command continues it.

Slurm preempts a job, or ends it at its time limit, with SIGTERM and, after a grace period, SIGKILL. From the
signal on, the run finishes the optimizer step it is in, saves a complete `checkpoint-<step>` exactly where
the Trainer's own step-end checkpoints are saved (so the resumed run takes the same steps as an
uninterrupted one), and raises `StoppedBySignal` (exit status 75): never a results.json for a half-trained
model. A signal during validation lets the validation finish and saves right after it; one during a save stops
on that checkpoint once it is complete; one while the test sets are scored stops at the next batch (the final
checkpoint is already on disk), and so does one while BLiMP is scored. A second SIGTERM during the save changes
nothing.

Why not transformers' own `enable_jit_checkpoint`: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from cola_hf.errors import RunFailed, StoppedBySignal
from cola_hf.training.output_dir import failed_since

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)


class SigtermLatch:
    """SIGTERM's handler while a run handles it: records the signal instead of dying from it."""

    def __init__(self) -> None:
        self.received: str | None = None  # the signal's name, once one arrived on this process

    def __call__(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            return  # a second SIGTERM (Slurm, a user pressing twice) must not cut the save short
        self.received = signal.Signals(signum).name
        logger.warning(
            "%s received: the run stops at its next step (after saving a checkpoint) or, once trained, its next "
            "batch of predictions",
            self.received,
        )


@contextlib.contextmanager
def catching_sigterm(peers_write_to: str | Path | None = None) -> Iterator[SigtermLatch]:
    """While inside, SIGTERM is recorded in the latch (from data loading on), for the Trainer to act on.

    `peers_write_to`: the output directory of a run of several processes. A SIGTERM there may also be the
    launcher's shutdown after another process failed (torchrun stops the survivors with SIGTERM, then SIGKILL);
    a survivor may then be blocked in a collective the failed process never joins (NCCL waits until its
    timeout), where no Python handler runs. `PeerFailureWatch` ends it at once when that process recorded its
    failure.
    """
    latch = SigtermLatch()
    previous = signal.signal(signal.SIGTERM, latch)
    watch = PeerFailureWatch(Path(peers_write_to)) if peers_write_to is not None else None
    try:
        yield latch
    finally:
        if watch is not None:
            watch.close()
        signal.signal(signal.SIGTERM, previous)


class PeerFailureWatch:
    """After a SIGTERM, ends this process when another process of the run recorded its failure (RUN_FAILED).

    Python runs signal handlers in the main thread, between bytecodes: not while it waits inside a collective.
    The interpreter's C-level handler does write the signal's number to the wakeup fd at once, so a thread
    reading it sees the signal whatever the main thread is doing. A preemption's SIGTERM finds no such record
    and is left to the latch: the run saves and stops as usual.
    """

    POLL_S = 0.2

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.started = time.time()
        self.closed = threading.Event()
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="cola-peer-failure-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.closed.is_set():
            try:
                received = self.reader.recv(64)
            except OSError:
                return
            if not received or self.closed.is_set():
                return
            if signal.SIGTERM in received:
                break
        while not self.closed.wait(self.POLL_S):
            if (failure := failed_since(self.output_dir, self.started)) is not None:
                print(
                    f"cola: error: another process of the run failed ({failure}); this one stops too",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(RunFailed.exit_code)

    def close(self) -> None:
        self.closed.set()
        signal.set_wakeup_fd(self.previous_fd)
        with contextlib.suppress(OSError):
            self.writer.send(b"\0")  # wakes the thread's recv
        self.thread.join(timeout=5)
        self.reader.close()
        self.writer.close()


class StopOnSignal(TrainerCallback):
    """Turns a received SIGTERM into a checkpoint at the next step end (or after validation), then a stop.

    The Trainer owns one from the start; it acts once `watch(latch)` gave it the run's latch.
    """

    def __init__(self, trainer: Trainer) -> None:
        # A proxy: the Trainer owns its callbacks, and a strong reference back would make a cycle that only the
        # garbage collector frees, keeping a finished run's model and optimizer state (on the GPU) until it runs.
        self.trainer = weakref.proxy(trainer)
        self.latch: SigtermLatch | None = None
        self.stopping = False
        self.training = False

    def watch(self, latch: SigtermLatch) -> None:
        self.latch = latch

    @property
    def received(self) -> str | None:
        return self.latch.received if self.latch is not None else None

    def agreed(self) -> bool:
        """Whether any process received the signal; every process must ask at the same point."""
        if self.latch is None:
            return False
        if self.trainer.args.world_size == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.trainer.args.device)
        return bool(self.trainer.accelerator.reduce(flag, reduction="sum").item() > 0)

    # --- where the Trainer asks ---
    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        if self.agreed():  # before any step: nothing to save
            raise self._stopped(state)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopping and self.agreed():
            # Saved where --save_steps would save: the Trainer's own checkpoint, at the Trainer's own point.
            self.stopping = control.should_save = True

    def on_evaluate(self, args, state, control, **kwargs):
        # Validation runs to its end (a checkpoint now would come before the epoch's validation, and a resumed
        # run would skip it); the checkpoint follows it.
        if self.training and not self.stopping and self.agreed():
            self.stopping = control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        # A signal that came during this save stops on it too: the checkpoint is complete, no step need follow.
        if self.stopping or (self.training and self.agreed()):
            raise self._stopped(state, checkpoint=f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_prediction_step(self, args, state, control, **kwargs):
        if not self.training and self.agreed():  # scoring the test sets: stop, the checkpoint is on disk
            raise self._stopped(state, during="while scoring the test sets")

    def stop_if_received(self, during: str) -> None:
        """Outside the Trainer's loops (BLiMP's scoring): stop now if any process received the signal; every
        process must ask at the same point."""
        if not self.training and self.agreed():
            raise self._stopped(self.trainer.state, during=during)

    def _stopped(self, state: Any, checkpoint: str | None = None, during: str | None = None) -> StoppedBySignal:
        self.stopping = True
        return StoppedBySignal(
            self.received or "SIGTERM", state.global_step, state.max_steps, checkpoint=checkpoint, during=during
        )


@contextlib.contextmanager
def handling_sigterm(trainer: Trainer) -> Iterator[StopOnSignal]:
    """SIGTERM saves and stops `trainer` (a TutorialTrainer: it owns a StopOnSignal) while inside."""
    stopper = trainer.stop_on_signal
    with catching_sigterm() as latch:
        stopper.watch(latch)
        try:
            yield stopper
        finally:
            stopper.latch = None
