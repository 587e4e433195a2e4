"""The tutorial's training loop as a `Trainer` subclass.

What the subclass changes, and why:
- Nothing in the optimiser or schedule. With `ColaTrainingArguments`' defaults the stock Trainer already builds
  exactly the tutorial's torch AdamW(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0) and
  `get_linear_schedule_with_warmup(0, batches_per_epoch * epochs)`, and clips the gradient norm at 1.0;
  tests/test_exactness.py checks it parameter by parameter against a hand-written tutorial loop. Only
  `--layerwise_lr_decay` below 1 replaces it: one parameter group per layer (cola_hf/training/optimizer.py).
- The batches. Each epoch's order is a function of (seed, epoch) only, cut into global batches that every
  layout trains alike (1 process or N, with or without accumulation), an epoch's short last batch split evenly
  instead of filled up with repeats (cola_hf/training/sampler.py). A run resumed at any step, and every process
  of a multi-process run, trains the batches of an uninterrupted single-process run.
- The loss. Each sentence of an optimizer step weighs 1 / (sentences in the step), however the step is split over
  micro-batches and processes (`sentence_mean_loss`, through transformers' `num_items_in_batch`).
- Per-epoch training statistics. The tutorial reports the mean loss over each epoch's batches and the epoch's
  wall time; Trainer only logs running means over logging windows. The loss is summed on the device (no
  host sync per step) and logged once per epoch as `train_epoch_loss` and `train_epoch_time_s`.
- A loss that turns NaN or infinite stops the run, naming the step, instead of training on garbage.
- A collapsed classifier (every validation sentence predicted as one class, so MCC is 0) is warned about at
  the epoch it happens, with the class counts and the usual remedies.
- SIGTERM, while the run handles it, saves a checkpoint and stops (cola_hf/training/preemption.py).
- `--early_stopping_patience`: the Trainer's EarlyStoppingCallback, its count carried over a resume
  (cola_hf/training/best_epoch.py).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from scipy.special import softmax
from torch.nn import functional
from torch.utils.data import SequentialSampler
from transformers import (
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import EvalLoopOutput, PredictionOutput, has_length

from cola_hf.errors import TrainingDiverged, UsageError
from cola_hf.metrics import compute_metrics
from cola_hf.results import EpochStats
from cola_hf.training.best_epoch import ResumableEarlyStopping
from cola_hf.training.optimizer import create_layerwise_optimizer
from cola_hf.training.preemption import StopOnSignal
from cola_hf.training.sampler import ORDERS, CollateEmptyAsPlaceholder, GlobalBatchSampler

if TYPE_CHECKING:
    from cola_hf.config import RunOptions

logger = logging.getLogger(__name__)


def sentence_mean_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
    """The step's loss, each sentence weighing 1 / (sentences in the optimizer step): the tutorial's batch mean.

    The model's own loss is its micro-batch's mean; the Trainer divides it by the accumulation steps and DDP
    averages it over processes: a mean of means, under which the sentences of an uneven split (an epoch's short last
    batch, 15 sentences as 8 + 7 or over 2 processes) weigh unequally. Given a `compute_loss_func`, the Trainer
    instead counts the labels of every micro-batch of the step on every process (`average_tokens_across_devices`,
    on by default) into `num_items_in_batch`, multiplies the returned loss by the number of processes (undoing
    DDP's average) and does not divide it by the accumulation steps. So: the micro-batch's summed cross-entropy
    over that count. Without a count (evaluation outside the Trainer), the batch mean.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    total = functional.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1), reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


class TutorialTrainer(Trainer):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("compute_loss_func", sentence_mean_loss)
        super().__init__(*args, **kwargs)
        # Sequence-classification heads take **kwargs, so the Trainer would hand them `num_items_in_batch`, which
        # their own loss ignores. The loss is sentence_mean_loss's: the model only computes the logits.
        self.model_accepts_loss_kwargs = False
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:  # a short last step may leave a process an empty micro-batch
            self.data_collator = CollateEmptyAsPlaceholder(self.data_collator, tokenizer)
        self.train_batches: GlobalBatchSampler | None = None  # the training sampler, once train() has built it
        self._epoch_loss_sum: torch.Tensor | None = None
        self._first_nonfinite_step: torch.Tensor | None = None
        self._epoch_statistics = _EpochStatistics(self)
        # Before the epoch statistics: a stop's save on an epoch's last step is then moved after its validation.
        # The last validation's output and the step it was taken at (see validation_predictions).
        self.last_validation: tuple[int, EvalLoopOutput] | None = None
        self.stop_on_signal = StopOnSignal(self)
        self.add_callback(self.stop_on_signal)
        self.add_callback(self._epoch_statistics)
        self.add_callback(_EpochOfTheBatches(self))
        if self.args.early_stopping_patience is not None:
            self.add_callback(ResumableEarlyStopping(self.args.early_stopping_patience))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.args.layerwise_lr_decay != 1.0:
            self.optimizer = create_layerwise_optimizer(self, self.model if model is None else model)
        return super().create_optimizer(model)  # with the optimizer made, only its bookkeeping

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._epoch_loss_sum is None:
            self._epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        # Each micro-batch's loss is its share of the step's mean (times the processes, which the reduction over
        # processes divides out), so the sum over an epoch is the sum of per-optimizer-step mean losses.
        self._epoch_loss_sum += loss.double()
        step = self.state.global_step + 1
        nonfinite_first_time = ~torch.isfinite(loss) & (self._first_nonfinite_step < 0)
        self._first_nonfinite_step = torch.where(nonfinite_first_time, step, self._first_nonfinite_step)
        return loss

    def evaluation_loop(self, *args, **kwargs) -> EvalLoopOutput:
        output = super().evaluation_loop(*args, **kwargs)
        if kwargs.get("metric_key_prefix") == "eval":
            self.last_validation = (self.state.global_step, output)
        return output

    def validation_predictions(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """predict_split of the validation split, reusing the validation after the last step when there was one.

        That validation scored the final model on the same sentences in the same order: a second pass would
        only repeat it (a few seconds of a CPU run). Otherwise (no training, a best model loaded back), predict.
        """
        if (
            self.last_validation is not None
            and self.last_validation[0] == self.state.global_step
            and not self.args.load_best_model_at_end
        ):
            return _labels_and_probabilities(self.last_validation[1], dataset)
        return predict_split(self, dataset)

    def _get_train_sampler(self, train_dataset=None):
        args = self.args
        if args.train_sampling_strategy not in ORDERS:  # set on TrainingArguments by hand: the Trainer's own
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        try:
            self.train_batches = GlobalBatchSampler(
                _lengths(dataset, self.train_dataset, args.length_column_name),
                per_device_batch=args.per_device_train_batch_size,
                accumulation=args.gradient_accumulation_steps,
                processes=args.world_size,
                rank=args.process_index,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                order=args.train_sampling_strategy,
                drop_last=args.dataloader_drop_last,
            )
        except ValueError as err:
            raise UsageError(str(err)) from err
        return self.train_batches

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        if is_training or not self.args.dataloader_drop_last:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        # --dataloader_drop_last drops an epoch's short last step from training; evaluation and the test sets
        # score every sentence (accelerate pads a shard that is short and gather_for_metrics drops the padding).
        self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        finally:
            self.args.dataloader_drop_last = True

    def _get_eval_sampler(self, eval_dataset):
        # Stock Trainer also length-groups (shuffles) evaluation when training groups by length; predictions
        # must come back in the dataset's order to line up with the sentences. Under several processes
        # accelerate shards these sequential batches and gather_for_metrics restores the order.
        return SequentialSampler(eval_dataset) if has_length(eval_dataset) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Saving never pushes: the run pushes once, last, with its own model card (integrations/hub.py's
        # push_trainer_output); the stock save_model would push the Trainer's generic card, and fail the run if
        # the Hub is down.
        super().save_model(output_dir, _internal_call=True)

    def raise_if_diverged(self) -> None:
        if self._first_nonfinite_step is not None and (step := int(self._first_nonfinite_step)) >= 0:
            raise TrainingDiverged(
                f"training loss became NaN or infinite at step {step}; try a lower --learning_rate, "
                "--warmup_steps, or full precision (no --fp16/--bf16, no `accelerate launch --mixed_precision`)"
            )

    def take_epoch_loss_sum(self, reset: bool = True) -> float:
        """The summed loss since the last reset, averaged over processes; resets the running sum unless told not to."""
        if self._epoch_loss_sum is None:
            return float("nan")
        total = self.accelerator.reduce(self._epoch_loss_sum.clone(), reduction="mean")
        if reset:
            self._epoch_loss_sum.zero_()
        return float(total)

    def _save_checkpoint(self, model, trial) -> None:
        # A checkpoint can fall mid-epoch (--save_strategy steps). Its trainer_state.json then keeps the epoch's
        # loss so far, so a run resumed from it reports the same epoch mean as an uninterrupted run. Every
        # process saves, so all of them join the reduction; only the main one writes the file.
        self.state.stateful_callbacks.pop(EPOCH_SO_FAR, None)
        if not float(self.state.epoch or 0).is_integer():
            self.state.stateful_callbacks[EPOCH_SO_FAR] = self._epoch_statistics.so_far(self.state.global_step)
        super()._save_checkpoint(model, trial)


def _lengths(dataset: Dataset, given: Dataset | None, column: str) -> list[int]:
    """Each training sentence's length in tokens: the tokenizer's `length` column, else measured.

    The Trainer hands the sampler the dataset without the columns the model does not take, `length` among them;
    the dataset it was given still has it, row for row.
    """
    for source in (dataset, given):
        if source is not None and column in getattr(source, "column_names", ()) and len(source) == len(dataset):
            return list(source[column])
    return [len(ids) for ids in dataset["input_ids"]]


class _EpochOfTheBatches(TrainerCallback):
    """Sets the training sampler's epoch as each epoch begins, from the step the run is at.

    The Trainer calls `set_epoch` through accelerate's wrappers, but not through the one a run resumed mid-epoch on
    several processes gets (skip_first_batches around the per-process shard): that sampler would replay epoch 0's
    order for the rest of the epoch.
    """

    def __init__(self, trainer: TutorialTrainer) -> None:
        # A proxy: the Trainer owns its callbacks, and a strong reference back would make a cycle that only the
        # garbage collector frees, keeping a finished run's model and optimizer state (on the GPU) until it runs.
        self.trainer = weakref.proxy(trainer)

    def on_epoch_begin(self, args, state, control, **kwargs):
        batches = self.trainer.train_batches
        if batches is not None:
            batches.set_epoch(state.global_step // batches.steps_per_epoch)  # how the Trainer counts its epochs


# The key of the partial epoch's statistics in a checkpoint's trainer_state.json ("stateful_callbacks").
EPOCH_SO_FAR = "cola_epoch_so_far"


class _EpochStatistics(TrainerCallback):
    """Times each epoch, logs its mean training loss, and watches for divergence and collapse."""

    def __init__(self, trainer: TutorialTrainer) -> None:
        # A proxy: the Trainer owns its callbacks, and a strong reference back would make a cycle that only the
        # garbage collector frees, keeping a finished run's model and optimizer state (on the GPU) until it runs.
        self.trainer = weakref.proxy(trainer)
        self.epoch_started = 0.0
        self.epoch_first_step = 0
        self.loss_before = 0.0  # the loss sum of this epoch's steps before the checkpoint a run resumed from
        self.save_at_epoch_end = False

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_started = time.perf_counter()
        self.trainer.take_epoch_loss_sum()  # count this epoch's steps from here
        saved = state.stateful_callbacks.get(EPOCH_SO_FAR) if state.stateful_callbacks else None
        if saved and saved["global_step"] == state.global_step:
            # Resumed from a checkpoint taken mid-epoch: the steps before it belong to this epoch too.
            self.epoch_first_step, self.loss_before = saved["epoch_first_step"], saved["loss_sum"]
        else:
            self.epoch_first_step, self.loss_before = state.global_step, 0.0

    def so_far(self, global_step: int) -> dict:
        """This epoch up to `global_step`, for a checkpoint: its first step and its loss sum over processes."""
        loss_sum = self.loss_before + self.trainer.take_epoch_loss_sum(reset=False)
        return {"global_step": global_step, "epoch_first_step": self.epoch_first_step, "loss_sum": loss_sum}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.trainer.raise_if_diverged()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and float(state.epoch or 0).is_integer():
            # A --save_steps checkpoint on an epoch's last step would come before the epoch's loss is logged
            # and its validation runs: a run resumed from it would skip both (and the random draws validation
            # makes), and train on differently. Take it at the epoch's end instead, like an epoch checkpoint.
            control.should_save, self.save_at_epoch_end = False, True

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.raise_if_diverged()
        if self.save_at_epoch_end:
            control.should_save, self.save_at_epoch_end = True, False
        steps = state.global_step - self.epoch_first_step
        loss_sum = self.loss_before + self.trainer.take_epoch_loss_sum()
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
                "Try a lower --learning_rate, --warmup_steps, --layerwise_lr_decay 0.8, --reinit_top_layers 1, "
                "--load_best_model_at_end true with --early_stopping_patience (a collapse is often passing), "
                "or another --seed (docs/stable-fine-tuning.md).",
                f"{state.epoch:g}" if state.epoch is not None else "?",
                sum(counts.values()),
                next(label for label, count in counts.items() if count),
            )


def epoch_table(log_history: list[dict]) -> list[EpochStats]:
    """One row per epoch from the Trainer's log history: the tutorial's training_stats, plus collapse flags."""
    rows: dict[int, EpochStats] = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        row = rows.setdefault(round(entry["epoch"]), EpochStats(epoch=round(entry["epoch"])))
        if "train_epoch_loss" in entry:
            row.training_loss = entry["train_epoch_loss"]
            row.training_time_s = entry["train_epoch_time_s"]
        if "eval_loss" in entry:
            row.valid_loss = entry["eval_loss"]
            row.valid_accuracy = entry.get("eval_accuracy")
            row.valid_mcc = entry.get("eval_matthews_correlation")
            row.validation_time_s = entry.get("eval_runtime")
            row.valid_predicted_acceptable = entry.get("eval_predicted_acceptable")
            row.valid_predicted_unacceptable = entry.get("eval_predicted_unacceptable")
            row.collapsed = 0 in (row.valid_predicted_acceptable, row.valid_predicted_unacceptable)
    return [row for _, row in sorted(rows.items()) if row.training_loss is not None or row.valid_loss is not None]


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
    return _labels_and_probabilities(trainer.predict(dataset, metric_key_prefix="test"), dataset)


def _labels_and_probabilities(
    output: EvalLoopOutput | PredictionOutput, dataset: Dataset
) -> tuple[np.ndarray, np.ndarray]:
    if not np.array_equal(output.label_ids, np.asarray(dataset["label"])):
        # Predictions are written next to their sentences: a sampler that reorders them must never pass silently.
        raise RuntimeError(f"predictions for {len(dataset)} sentences came back in another order or count")
    return output.label_ids, softmax(output.predictions, axis=-1)[:, 1]


def build_trainer(
    options: RunOptions,
    tokenized: DatasetDict,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trainer_class: type[TutorialTrainer] = TutorialTrainer,
    callbacks: Sequence[TrainerCallback] = (),
) -> TutorialTrainer:
    """The run's Trainer: the tutorial's loop on `tokenized` (split_cola's splits), batches padded per batch."""
    args = options.training
    return trainer_class(
        model=model,
        args=args,
        train_dataset=tokenized["train"] if args.do_train else None,
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        # On CUDA to a multiple of 8: tensor cores take whole tiles, and --torch_compile meets fewer shapes. On the
        # CPU the extra positions would only cost time.
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if args.device.type == "cuda" else None),
        compute_metrics=compute_metrics,
        callbacks=list(callbacks) or None,
    )
