"""The tutorial's training loop as a `Trainer` subclass.

What the subclass changes, and why:
- Nothing in the optimiser or schedule. With `ColaTrainingArguments`' defaults the stock Trainer already builds
  exactly the tutorial's torch AdamW(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0) and
  `get_linear_schedule_with_warmup(0, batches_per_epoch * epochs)`, and clips the gradient norm at 1.0;
  tests/test_exactness.py checks it parameter by parameter against a hand-written tutorial loop.
- Per-epoch training statistics. The tutorial reports the mean loss over each epoch's batches and the epoch's
  wall time; Trainer only logs running means over logging windows. The loss is summed on the device (no
  host sync per step) and logged once per epoch as `train_epoch_loss` and `train_epoch_time_s`.
- A loss that turns NaN or infinite stops the run, naming the step, instead of training on garbage.
- A collapsed classifier (every validation sentence predicted as one class, so MCC is 0) is warned about at
  the epoch it happens, with the class counts and the usual remedies.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from datasets import Dataset
from scipy.special import softmax
from torch.utils.data import SequentialSampler
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length

from cola_hf.errors import RunFailed, UsageError

logger = logging.getLogger(__name__)


class TrainingDiverged(RunFailed):
    """The training loss stopped being a finite number."""


class TutorialTrainer(Trainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Scale-out (issue 4). Sequence-classification heads take **kwargs, so Trainer assumes their loss is
        # a sum normalised by `num_items_in_batch`: it then multiplies the loss by the number of processes
        # and skips the division by the accumulation steps. Their loss is a plain batch mean, so that
        # doubles the loss and gradients on 2 processes or with 2 accumulation steps. A plain mean is what
        # the tutorial optimises: say so, and DDP's gradient average gives the global batch's mean.
        self.model_accepts_loss_kwargs = False
        self._epoch_loss_sum: torch.Tensor | None = None
        self._first_nonfinite_step: torch.Tensor | None = None
        self.add_callback(_EpochStatistics(self))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._epoch_loss_sum is None:
            self._epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        # The loss comes back divided by the accumulation steps, so the sum over an epoch is the sum of
        # per-optimizer-step mean losses.
        self._epoch_loss_sum += loss.double()
        step = self.state.global_step + 1
        nonfinite_first_time = ~torch.isfinite(loss) & (self._first_nonfinite_step < 0)
        self._first_nonfinite_step = torch.where(nonfinite_first_time, step, self._first_nonfinite_step)
        return loss

    def _get_train_sampler(self, train_dataset=None):
        # Length grouping over the GLOBAL batch (stock Trainer uses the per-device one), so the sentences
        # that make up each optimizer step don't depend on the number of processes: each process takes its
        # consecutive per-device slice, and 2 x 16 sees exactly the batches of 1 x 32.
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        column = self.args.length_column_name
        lengths = dataset[column] if column in getattr(dataset, "column_names", ()) else None
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(global_batch, dataset=dataset, lengths=lengths, model_input_name="input_ids")

    def _get_eval_sampler(self, eval_dataset):
        # Stock Trainer also length-groups (shuffles) evaluation when training groups by length; predictions
        # must come back in the dataset's order to line up with the sentences. Under several processes
        # accelerate shards these sequential batches and gather_for_metrics restores the order.
        return SequentialSampler(eval_dataset) if has_length(eval_dataset) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Saving never pushes: the run pushes once, last, with its own model card (cola_hf.hub.push_trainer_output);
        # the stock save_model would push the Trainer's generic card, and fail the run if the Hub is down.
        super().save_model(output_dir, _internal_call=True)

    def raise_if_diverged(self) -> None:
        if self._first_nonfinite_step is not None and (step := int(self._first_nonfinite_step)) >= 0:
            raise TrainingDiverged(
                f"training loss became NaN or infinite at step {step}; try a lower --learning_rate, "
                "--warmup_steps, or --mixed_precision no"
            )

    def take_epoch_loss_sum(self) -> float:
        """The summed loss since the last call, averaged over processes; resets the running sum."""
        if self._epoch_loss_sum is None:
            return float("nan")
        total = self.accelerator.reduce(self._epoch_loss_sum.clone(), reduction="mean")
        self._epoch_loss_sum.zero_()
        return float(total)


class _EpochStatistics(TrainerCallback):
    """Times each epoch, logs its mean training loss, and watches for divergence and collapse."""

    def __init__(self, trainer: TutorialTrainer) -> None:
        self.trainer = trainer
        self.epoch_started = 0.0
        self.epoch_first_step = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_started = time.perf_counter()
        self.epoch_first_step = state.global_step
        self.trainer.take_epoch_loss_sum()  # a resumed run starts its epoch mid-way: count from here

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.trainer.raise_if_diverged()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.raise_if_diverged()
        steps = state.global_step - self.epoch_first_step
        loss_sum = self.trainer.take_epoch_loss_sum()
        self.trainer.log(
            {
                "train_epoch_loss": loss_sum / steps if steps else float("nan"),
                "train_epoch_time_s": time.perf_counter() - self.epoch_started,
            }
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        counts = collapse_counts(metrics or {})
        if counts is not None:
            logger.warning(
                "Collapsed classifier at epoch %s: all %d validation sentences predicted %s (MCC is 0). "
                "Try a lower --learning_rate, --warmup_steps, or another --seed.",
                f"{state.epoch:g}" if state.epoch is not None else "?",
                sum(counts.values()),
                next(label for label, count in counts.items() if count),
            )


def collapse_counts(eval_metrics: dict) -> dict[str, int] | None:
    """Class counts of the validation predictions when they are all one class, else None."""
    counts = {
        "acceptable": eval_metrics.get("eval_predicted_acceptable"),
        "unacceptable": eval_metrics.get("eval_predicted_unacceptable"),
    }
    if None in counts.values() or min(counts.values()) > 0:
        return None
    return {label: int(count) for label, count in counts.items()}


def predict_split(trainer: Trainer, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probability of 'acceptable') for every sentence, in the dataset's order, gathered once each."""
    output = trainer.predict(dataset, metric_key_prefix="test")
    if not np.array_equal(output.label_ids, np.asarray(dataset["label"])):
        # Predictions are written next to their sentences: a sampler that reorders them must never pass silently.
        raise RuntimeError(f"predictions for {len(dataset)} sentences came back in another order or count")
    return output.label_ids, softmax(output.predictions, axis=-1)[:, 1]


LABELS = {0: "unacceptable", 1: "acceptable"}


def load_model_and_tokenizer(
    model_name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint's fast tokenizer and a 2-label classifier with CoLA's label names."""
    options = {"cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **options)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path,
            num_labels=len(LABELS),
            id2label=LABELS,
            label2id={label: index for index, label in LABELS.items()},
            use_safetensors=None if trust_remote_code else True,
            **options,
        )
    except OSError as err:
        hint = (
            ""
            if os.path.isdir(model_name_or_path)
            else (
                "; not a local directory, and the Hub could not provide it (offline? pass a local checkpoint "
                "directory, or set HF_HUB_OFFLINE=1 to use the cache)"
            )
        )
        raise UsageError(f"model '{model_name_or_path}': cannot load ({_first_line(err)}){hint}") from err
    return model, tokenizer


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
