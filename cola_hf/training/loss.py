"""The tutorial's loss, whatever the layout: each sentence of an optimizer step weighs 1 / (sentences in the step).

The model's own loss is the mean over its micro-batch. The Trainer then divides it by the accumulation steps and
DDP averages it over the processes: a mean of means, so the sentences of an uneven split (the short last step of
an epoch: 15 sentences as 8 + 7, or over 2 processes) weigh unequally, and the step is not the tutorial's.

transformers' `num_items_in_batch` is the mechanism that fixes it, used as the Trainer intends: given a
`compute_loss_func`, the Trainer counts the labels of every micro-batch of the step over every process
(`average_tokens_across_devices`, on by default) and passes that count to it; it then multiplies the loss by the
number of processes (undoing DDP's average) and does not divide by the accumulation steps. So the function returns
the micro-batch's SUMMED cross-entropy over that count, and the gradients summed over micro-batches and processes
are the gradient of the step's mean loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional


def sentence_mean_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
    """Cross-entropy summed over this micro-batch, divided by the sentences of the whole step (or of this batch)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    total = functional.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1), reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())
