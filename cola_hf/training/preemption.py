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
import signal
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from cola_hf.errors import StoppedBySignal

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
def catching_sigterm() -> Iterator[SigtermLatch]:
    """While inside, SIGTERM is recorded in the latch (from data loading on), for the Trainer to act on."""
    latch = SigtermLatch()
    previous = signal.signal(signal.SIGTERM, latch)
    try:
        yield latch
    finally:
        signal.signal(signal.SIGTERM, previous)


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
