"""The training batches: a pure function of (seed, epoch), the same optimizer steps on every layout."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate.data_loader import SeedableRandomSampler

from cola_hf.training.sampler import ORDERS, GlobalBatchSampler

pytestmark = pytest.mark.lowest

# A spread of lengths like CoLA's (3 to 40 tokens), 110 sentences: 3 full steps of 32 and a last one of 14.
_draw = random.Random(0)
LENGTHS = [_draw.randint(3, 40) for _ in range(110)]
# (per-device batch, accumulation, processes): every way to lay out a global batch of 32 that the tests use.
LAYOUTS = [(32, 1, 1), (8, 4, 1), (16, 1, 2), (8, 2, 2), (4, 2, 4), (4, 1, 8)]


def sampler(layout=(32, 1, 1), rank=0, **options) -> GlobalBatchSampler:
    per_device, accumulation, processes = layout
    return GlobalBatchSampler(
        options.pop("lengths", LENGTHS), per_device_batch=per_device, accumulation=accumulation,
        processes=processes, rank=rank, **options,
    )  # fmt: skip


def steps_seen(layout, epoch: int, **options) -> list[list[int]]:
    """Each optimizer step's sentences, gathered from what every process yields, as the Trainer consumes them."""
    per_device, accumulation, processes = layout
    yielded = []
    for rank in range(processes):
        process = sampler(layout, rank=rank, **options)
        process.set_epoch(epoch)
        micro_batches = list(process)
        assert len(micro_batches) == len(process)  # the DataLoader's length is what it yields
        assert all(0 < len(batch) <= per_device for batch in micro_batches)
        yielded.append(micro_batches)
    assert len({len(batches) for batches in yielded}) == 1  # every process takes the same number of steps
    # The Trainer groups `accumulation` micro-batches into a step; the last step may have fewer.
    steps, position = [], 0
    for step_size in [accumulation] * (len(LENGTHS) // 32) + [process.micro_batches_in_step(len(LENGTHS) % 32)]:
        steps.append(
            sorted(i for batches in yielded for batch in batches[position : position + step_size] for i in batch)
        )
        position += step_size
    assert position == len(yielded[0])
    return steps


@pytest.mark.parametrize("order", ORDERS)
def test_every_layout_takes_the_same_optimizer_steps_each_sentence_once_per_epoch(order):
    for epoch in range(3):
        reference = steps_seen(LAYOUTS[0], epoch, order=order)
        assert [len(step) for step in reference] == [32, 32, 32, 14]
        assert sorted(i for step in reference for i in step) == list(range(len(LENGTHS)))
        for layout in LAYOUTS[1:]:
            assert steps_seen(layout, epoch, order=order) == reference, (layout, epoch)


@pytest.mark.parametrize("order", ["random", "group_by_length"])
def test_the_order_is_a_function_of_seed_and_epoch_only(order):
    torch.manual_seed(0)
    first = sampler(order=order, seed=7)
    first.set_epoch(1)
    batches = list(first)
    torch.manual_seed(123)  # another global random state, as dropout leaves it, or a resumed process has it
    torch.rand(1000)
    second = sampler(order=order, seed=7)
    list(second)  # an epoch-0 pass first: what a run that went through epoch 0 did
    second.set_epoch(1)
    assert list(second) == batches
    second.set_epoch(2)
    assert list(second) != batches
    other_seed = sampler(order=order, seed=8)
    other_seed.set_epoch(1)
    assert list(other_seed) != batches


def test_random_order_is_the_trainers_seedable_random_sampler():
    """The random path keeps the permutation accelerate's SeedableRandomSampler (the Trainer's default) draws."""
    stock = SeedableRandomSampler(range(len(LENGTHS)), data_seed=42)
    ours = sampler(order="random", seed=42)
    for epoch in range(3):
        stock.set_epoch(epoch)
        ours.set_epoch(epoch)
        assert [i for batch in ours for i in batch] == list(stock)


def test_a_short_last_step_is_split_evenly_over_processes_and_micro_batches():
    for layout, expected in [
        ((16, 1, 2), [[7], [7]]),  # not 16 + 16 with 18 sentences repeated from the start of the epoch
        ((8, 4, 1), [[7, 7]]),  # 2 micro-batches of the 4: the Trainer takes a shorter last step
        ((8, 2, 2), [[7], [7]]),
        ((4, 2, 4), [[4], [4], [3], [3]]),
    ]:
        split = sampler(layout).split(list(range(14)))  # [process][micro-batch]
        assert [[len(batch) for batch in process] for process in split] == expected, layout
        assert sorted(i for process in split for batch in process for i in batch) == list(range(14))


@pytest.mark.parametrize(
    ("sentences", "layout"),
    [(5, (1, 2, 2)), (15, (1, 1, 16)), (1, (2, 1, 4)), (33, (2, 2, 8)), (3, (1, 1, 3))],
    ids=["1-on-2x2", "15-on-16", "1-on-4", "1-on-8x2", "3-on-3"],
)
def test_a_last_step_shorter_than_the_processes_leaves_some_micro_batches_empty(sentences, layout):
    """Every process yields the same number of micro-batches (each takes part in the step's collectives); the
    sentences are each in one of them, and only a process without a sentence gets an empty one."""
    per_device, accumulation, processes = layout
    lengths = [10] * sentences
    yielded = [list(sampler(layout, rank=rank, lengths=lengths)) for rank in range(processes)]
    assert len({len(batches) for batches in yielded}) == 1
    assert len(yielded[0]) == len(sampler(layout, lengths=lengths))
    assert sorted(i for batches in yielded for batch in batches for i in batch) == list(range(sentences))
    last_step = sampler(layout, lengths=lengths).split(sampler(layout, lengths=lengths).global_batches(0)[-1])
    sizes = [len(batch) for process in last_step for batch in process]
    assert max(sizes) - min(sizes) <= 1  # split evenly: empty micro-batches only where there are more than sentences
    dropped = sampler(layout, lengths=lengths, drop_last=True)
    assert dropped.steps_per_epoch == sentences // (per_device * accumulation * processes)


def test_length_grouping_cuts_the_padding_of_random_batches():
    lengths = [_draw.randint(3, 40) for _ in range(2000)]  # enough for mega-batches of several global batches

    def padded_tokens(order: str, layout: tuple[int, int, int]) -> int:
        return sum(
            len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch)
            for batch in sampler(layout, order=order, lengths=lengths)
        )

    for layout in [(32, 1, 1), (8, 4, 1)]:
        assert padded_tokens("group_by_length", layout) < padded_tokens("random", layout) / 2, layout


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="order 'shuffled'"):
        sampler(order="shuffled")
    with pytest.raises(ValueError, match="rank below processes"):
        sampler((16, 1, 2), rank=2)
