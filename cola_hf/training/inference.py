"""Many sentences through a sequence-classification model, fast: P(acceptable) of each, in the input order.

Sentences go longest first, in batches of neighbours in length, so each batch pads only to its own longest
sentence; under `torch.inference_mode` on the device the model is on (the accelerator, when the model was
placed there), with the logits kept there until the end so that no batch waits for a copy to the host. A batch
is cut from the tokenized ids with numpy, not a collator: for short sentences the collator's Python loop costs
more than the model. The probabilities are computed in float64 from the logits, so that two confident
sentences keep distinct probabilities (float32's softmax rounds both to 1.0 from a logit gap of about 17).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

DEFAULT_BATCH_SIZE = 256  # sentences per forward pass; BLiMP's are short (about 10 tokens)


def acceptable_index(model: PreTrainedModel) -> int:
    """The logit of 'acceptable': by the model's label names where it has them, else 1 (CoLA's label 1)."""
    return int(model.config.label2id.get("acceptable", 1))


def acceptable_probabilities(
    model: PreTrainedModel,
    input_ids: datasets.Dataset | Sequence[Sequence[int]],
    *,
    pad_token_id: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "Scoring",
    before_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """P(acceptable) of every tokenized sentence (a dataset's `input_ids` column, or lists of ids), in order.

    Single sentences only: no token type ids are passed (they are all zero for one segment). `autocast_dtype`
    (torch.bfloat16, say) runs the forward passes under autocast, as a bf16 Trainer evaluates. `before_batch` is
    called before each batch: it raises to stop (a SIGTERM, say).
    """
    offsets, values = _ragged(input_ids)
    lengths = np.diff(offsets)
    count = len(lengths)
    if count == 0:
        return np.zeros(0)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    device = next(model.parameters()).device
    order = np.argsort(-lengths, kind="stable")  # longest first: a batch too big for memory fails at once
    # In the sorted order: writing each batch to its own rows would copy their indices to the device, a copy that
    # waits for the forward pass before the next batch is cut.
    sorted_logits = torch.empty((count, model.config.num_labels), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None),
            tqdm(total=count, unit="sentence", desc=desc, disable=not progress) as bar,
        ):
            for start in range(0, count, batch_size):
                if before_batch is not None:
                    before_batch()
                rows = order[start : start + batch_size]
                ids, mask = _pad(offsets[rows], lengths[rows], values, pad_token_id)
                output = model(input_ids=_to(ids, device), attention_mask=_to(mask, device))
                sorted_logits[start : start + len(rows)] = output.logits.float()
                bar.update(len(rows))
    finally:
        model.train(was_training)
    probabilities = np.empty(count)
    probabilities[order] = torch.softmax(sorted_logits.cpu().double(), dim=-1)[:, acceptable_index(model)].numpy()
    return probabilities


def _ragged(input_ids: datasets.Dataset | Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Row i's ids are values[offsets[i]:offsets[i + 1]]."""
    if isinstance(input_ids, datasets.Dataset):
        # Arrow's own layout, without a Python object per row; a selection's rows are taken first.
        column = input_ids.with_format("arrow", columns=["input_ids"])[:]["input_ids"].combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)
        return offsets - offsets[0], column.values.to_numpy()[offsets[0] : offsets[-1]]
    lengths = np.fromiter((len(ids) for ids in input_ids), dtype=np.int64, count=len(input_ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.fromiter((token for ids in input_ids for token in ids), dtype=np.int64, count=int(offsets[-1]))
    return offsets, values


def _pad(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray, pad_token_id: int) -> tuple[np.ndarray, ...]:
    """A right-padded (rows, longest) batch of ids and its attention mask."""
    columns = np.arange(lengths.max())
    mask = columns[None, :] < lengths[:, None]
    positions = np.where(mask, starts[:, None] + columns[None, :], 0)
    return np.where(mask, values[positions], pad_token_id).astype(np.int64), mask.astype(np.int64)


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # pinned, so the copy overlaps the previous batch's compute
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
