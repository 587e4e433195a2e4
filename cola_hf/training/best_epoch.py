"""Keeping a run's best epoch: the Trainer's own `load_best_model_at_end` on validation MCC, its
`EarlyStoppingCallback` for the patience, and which epoch that was, from the Trainer's state.

The Trainer already keeps the best checkpoint on disk beside the latest (whatever `save_total_limit`), records it in
trainer_state.json (`best_global_step`, `best_metric`) and loads it back after training, before the test sets are
scored. What it does not do is carry the early-stopping count over a resume: it restores callbacks' states only
with `restore_callback_states_from_checkpoint`, which would also restore the checkpoint's `TrainerControl` (a
save taken on SIGTERM would be taken again). `ResumableEarlyStopping` restores its own count and nothing else.
"""

from __future__ import annotations

from transformers import EarlyStoppingCallback, TrainerState


class ResumableEarlyStopping(EarlyStoppingCallback):
    """EarlyStoppingCallback that continues its count of validations without improvement after a resume."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):  # resumed: the checkpoint's count, as saved
            self.early_stopping_patience_counter = saved["attributes"]["early_stopping_patience_counter"]


def kept_epoch(state: TrainerState, load_best_model_at_end: bool) -> int | None:
    """The epoch whose model was kept (load_best_model_at_end), from the validation logged at the best step;
    None when the run kept its last model."""
    if not load_best_model_at_end or state.best_global_step is None:
        return None
    for entry in state.log_history:
        if entry.get("step") == state.best_global_step and "eval_loss" in entry and "epoch" in entry:
            return round(entry["epoch"])
    return None
