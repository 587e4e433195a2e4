"""A trained model's P(acceptable) for many sentences (BLiMP's pairs), in float32, on every process of a run.

Float32 whatever the run's precision: a pair is judged by the difference of two often close probabilities, and
half precision's logits (steps of 1/64 near 3 in bf16) would round many pairs into ties, counted wrong. Under
--bf16/--fp16 accelerate replaces the model's `forward` with one that runs inside an autocast of the run's
precision, an autocast no outer `torch.autocast(enabled=False)` can switch off; so the scorer calls the model's
own forward, and scores a float32 copy where the weights themselves are not float32 (DeepSpeed's bf16 mode).

Every process scores its share and the shares are gathered: under FSDP the model's forward gathers each layer's
weights from every process, so one process cannot score alone while the others have moved on. There each
process scores an ordinary full copy of the model instead (its full state dict, gathered once).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from types import MethodType

import datasets
import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, Trainer

from cola_hf.training.inference import acceptable_probabilities


def score_on_every_process(
    trainer: Trainer,
    sentences: datasets.Dataset,
    *,
    pad_token_id: int | None,
    progress: bool,
    desc: str,
    before_batch: Callable[[], None] | None = None,
) -> np.ndarray | None:
    """P(acceptable) of every sentence (its `input_ids`), in float32: on the main process, in order; None on the
    others. Every process must call it. `before_batch` is called before each batch on every process (the same
    number of times on each): it raises to stop."""
    processes, rank = trainer.args.world_size, trainer.args.process_index
    # An equal share each (the last padded with repeats of its first sentence), so that every process passes
    # `before_batch` as often as the others: it may take part in a collective.
    share = -(-len(sentences) // processes)
    rows = np.arange(rank * share, (rank + 1) * share)
    rows = np.where(rows < len(sentences), rows, rows[0] if rows[0] < len(sentences) else 0)
    own = sentences.select(rows) if processes > 1 else sentences
    with float32_model(trainer) as model:
        probabilities = acceptable_probabilities(
            model,
            own,
            pad_token_id=pad_token_id,
            progress=progress and rank == 0,
            desc=desc,
            before_batch=before_batch,
        )
    if processes == 1:
        return probabilities
    shares: list[np.ndarray | None] = [None] * processes
    torch.distributed.all_gather_object(shares, probabilities)
    return np.concatenate(shares)[: len(sentences)] if rank == 0 else None


@contextlib.contextmanager
def float32_model(trainer: Trainer) -> Iterator[nn.Module]:
    """The Trainer's model as an ordinary float32 module, its forward without accelerate's autocast, while inside."""
    if _sharded(trainer.model):
        yield _full_copy(trainer)
        return
    model = trainer.accelerator.unwrap_model(trainer.model)  # DDP's, DeepSpeed's containers
    if any(parameter.dtype != torch.float32 for parameter in model.parameters()):
        yield _own_forward(copy.deepcopy(model)).float()
        return
    wrapped = model.__dict__.get("forward")
    _own_forward(model)
    try:
        yield model
    finally:
        if wrapped is not None:
            model.forward = wrapped


def _own_forward(model: nn.Module) -> nn.Module:
    """The model with its class's forward: accelerate's mixed-precision wrapper (an instance attribute that wraps
    it, `__wrapped__` after `__wrapped__`) taken off."""
    forward = model.__dict__.get("forward")
    if forward is not None:
        function = getattr(forward, "__func__", forward)
        while hasattr(function, "__wrapped__"):
            function = function.__wrapped__
        model.forward = MethodType(function, model)
    return model


def _sharded(model: nn.Module) -> bool:
    """Whether the model's weights are sharded over the processes: FSDP2 (`fully_shard`: DTensor parameters, as
    accelerate's FSDP config makes them) or FSDP1's wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return isinstance(model, FullyShardedDataParallel) or any(isinstance(p, DTensor) for p in model.parameters())


def _full_copy(trainer: Trainer) -> nn.Module:
    """An ordinary float32 model with the FSDP-sharded model's full weights, on this process's device; every
    process must call it (the weights are gathered from all of them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = trainer.accelerator.unwrap_model(trainer.model)
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    full = AutoModelForSequenceClassification.from_config(sharded.config, dtype=torch.float32)
    full.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return full.to(trainer.args.device)
