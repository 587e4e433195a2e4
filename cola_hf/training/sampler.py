"""The training batches of an epoch as a pure function of (seed, epoch), the same optimizer steps on any layout.

An epoch's order is drawn from a generator of its own, seeded with `seed + epoch` (as accelerate's
`SeedableRandomSampler` and torch's `DistributedSampler.set_epoch` do), never from the global random state:

- `random`: `torch.randperm`, the very permutation `SeedableRandomSampler` (the Trainer's random path) draws;
- `group_by_length`: transformers' `get_length_grouped_indices` over the GLOBAL batch (a random permutation,
  mega-batches sorted by length), so each optimizer step holds sentences of similar length;
- `sequential`: the dataset's order.

The order is cut into global batches (the last one of an epoch may be shorter), and each global batch into
processes x accumulation micro-batches; each process yields its own. Every process computes the same cut, so the
sentences of each optimizer step are the same on 1 process as on N, with or without accumulation.

Why not the stock samplers:
- transformers' `LengthGroupedSampler` draws its permutation from the global torch RNG when an epoch's iterator
  starts. Dropout moves that RNG, so a run resumed mid-epoch (the Trainer restores the checkpoint's RNG only after
  that moment) and each process of a multi-process run (whose dropout draws differ) get other permutations: from
  the second epoch on, sentences are trained twice or never.
- accelerate's `BatchSamplerShard` fills a last batch shorter than the global batch with sentences from the start
  of the epoch, so on N processes the last step of every epoch trains repeats. Here that step is split evenly.
  A last step with fewer sentences than micro-batches over the processes (15 sentences on 16 processes) leaves
  some micro-batches empty: such a process still yields one, so that it takes part in the step's collectives, and
  the trainer turns it into a placeholder of zero weight (TutorialTrainer's collator).

It is a `BatchRebalanceSampler` for the Trainer's sake: that is how the Trainer recognises a batch sampler that is
already per process (it passes it as the DataLoader's `batch_sampler` and keeps accelerate from sharding it again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler, get_length_grouped_indices

ORDERS = ("random", "group_by_length", "sequential")


class GlobalBatchSampler(BatchRebalanceSampler):
    """One process's micro-batches of an epoch; `set_epoch` chooses the epoch (the Trainer calls it)."""

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        per_device_batch: int,
        accumulation: int = 1,
        processes: int = 1,
        rank: int = 0,
        seed: int = 42,
        order: str = "group_by_length",
        drop_last: bool = False,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order {order!r}: expected one of {', '.join(ORDERS)}")
        if min(per_device_batch, accumulation, processes) < 1 or not 0 <= rank < processes:
            raise ValueError(
                "per_device_batch, accumulation and processes must be at least 1, and rank below processes"
            )
        super().__init__(
            lengths,
            effective_batch_size=per_device_batch * accumulation * processes,
            dp_size=processes,
            grad_accum=accumulation,
            shuffle=order != "sequential",
            seed=seed,
            rank=rank,
            drop_last=drop_last,
        )
        self.per_device_batch = per_device_batch
        self.order = order

    @property
    def global_batch(self) -> int:
        return self.effective_batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch."""
        return self.num_global_batches

    def micro_batches_in_step(self, sentences: int) -> int:
        """Micro-batches per process in a step of `sentences`: the accumulation, fewer in a short last step."""
        per_round = self.per_device_batch * self.dp_size
        return min(self.grad_accum, -(-sentences // per_round))

    def epoch_order(self, epoch: int) -> list[int]:
        """Every sentence index once, in the order epoch `epoch` trains them."""
        count = len(self.lengths)
        if self.order == "sequential":
            return list(range(count))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.order == "random":
            return torch.randperm(count, generator=generator).tolist()
        return get_length_grouped_indices(self.lengths, self.global_batch, generator=generator)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The sentences of each optimizer step of epoch `epoch`, over all processes."""
        order = self.epoch_order(epoch)
        return [order[start : start + self.global_batch] for start in range(0, len(order), self.global_batch)][
            : self.num_global_batches
        ]

    def split(self, batch: list[int]) -> list[list[list[int]]]:
        """A global batch as `[process][micro-batch]` index lists: consecutive, sizes differing by at most one
        (some empty when the batch has fewer sentences than there are micro-batches).

        Consecutive, because a length-grouped global batch is sorted by length: each micro-batch then pads little.
        """
        slots = self.micro_batches_in_step(len(batch))
        parts = self.dp_size * slots
        size, larger = divmod(len(batch), parts)
        bounds = [0]
        for part in range(parts):
            bounds.append(bounds[-1] + size + (part < larger))
        # Part k goes to process k % processes as its micro-batch k // processes.
        return [
            [
                batch[bounds[slot * self.dp_size + rank] : bounds[slot * self.dp_size + rank + 1]]
                for slot in range(slots)
            ]
            for rank in range(self.dp_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(self.epoch):
            yield from self.split(batch)[self.rank]

    def __len__(self) -> int:
        """Micro-batches this process yields in an epoch (the DataLoader's length)."""
        tail = self.micro_batches_in_step(self.remainder) if self.has_tail else 0
        return self.num_full_batches * self.grad_accum + tail


class CollateEmptyAsPlaceholder:
    """A collator that turns an empty micro-batch (GlobalBatchSampler's, in a short last step) into one sentence
    of zero weight.

    The process must still run a forward and backward pass, so that it joins the gradient all-reduce and the
    count of the step's sentences (`num_items_in_batch`) like every other process. The placeholder is the empty
    sentence with label -100: cross-entropy ignores it and the Trainer does not count it, so its gradient is
    exactly zero and the step's loss is the mean over the sentences the other processes hold.
    """

    def __init__(self, collator: Callable[[list[dict]], Any], tokenizer: Any) -> None:
        self.collator = collator
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> Any:
        if not features:
            features = [{**self.tokenizer(""), "label": IGNORED_LABEL}]
        return self.collator(features)


IGNORED_LABEL = -100  # torch's cross_entropy ignore_index, which the Trainer's item count skips too
