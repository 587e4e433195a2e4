"""An encoder's layers, found from its module tree: what layer-wise learning rates and re-initialisation act on.

The families name their layers differently (BERT, RoBERTa, ELECTRA, DeBERTa-v2: `encoder.layer.N`; DistilBERT:
`transformer.layer.N`; ModernBERT: `layers.N`), so the layers are not found by name but as the one `ModuleList`
of the base model that holds `num_hidden_layers` modules. Every parameter then has a depth:

    0          the embeddings (any parameter of the base model outside the layers whose name says `embed`:
               word, position and type embeddings, their norm, ELECTRA's projection, DeBERTa's relative positions)
    1 .. n     encoder layer 0 .. n-1
    n + 1      everything above: the pooler, final norms, the classification head
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from cola_hf.errors import UsageError


@dataclass(frozen=True)
class LayerTree:
    """Where an encoder's layers are: the list of them, its path in the model, and the pooler if there is one."""

    layers: nn.ModuleList
    path: str  # "bert.encoder.layer", "distilbert.transformer.layer", "model.layers"
    pooler: nn.Module | None
    pooler_path: str

    @property
    def count(self) -> int:
        return len(self.layers)


def layer_tree(model: PreTrainedModel, option: str) -> LayerTree:
    """The model's encoder layers; one line naming `option` when the model has no list of them to act on."""
    count = getattr(model.config, "num_hidden_layers", None)
    base = model.base_model
    prefix = "" if base is model else f"{model.base_model_prefix}."
    lists = [
        (name, module)
        for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and count is not None and len(module) == count
    ]
    if not lists:
        # ALBERT shares one layer's weights over its depth; other architectures may keep theirs elsewhere.
        raise UsageError(
            f"{option}: {model.config.model_type} has no list of {count} encoder layers to act on; "
            "use an encoder with one module per layer (BERT, RoBERTa, ELECTRA, DeBERTa, DistilBERT, ModernBERT)"
        )
    # Prefer the list named as layers are (`layer`, `layers`) over any other list of the same length.
    name, layers = next(((n, m) for n, m in lists if n.rsplit(".", 1)[-1] in ("layer", "layers")), lists[0])
    return LayerTree(layers, prefix + name, getattr(base, "pooler", None), prefix + "pooler")


def parameter_depths(model: PreTrainedModel, tree: LayerTree) -> dict[str, int]:
    """Every trainable parameter's depth (module docstring), by its name in `model.named_parameters()`."""
    in_layer = {id(parameter): index + 1 for index, layer in enumerate(tree.layers) for parameter in layer.parameters()}
    base_parameters = {id(parameter) for parameter in model.base_model.parameters()}
    top = tree.count + 1
    depths = {}
    for name, parameter in model.named_parameters():
        if id(parameter) in in_layer:
            depths[name] = in_layer[id(parameter)]
        elif id(parameter) in base_parameters and "embed" in name.lower():
            depths[name] = 0
        else:
            depths[name] = top
    return depths


def depth_name(depth: int, tree: LayerTree) -> str:
    """'embeddings', 'bert.encoder.layer.3', 'head': what a depth is, for the optimizer's groups and the log."""
    if depth == 0:
        return "embeddings"
    if depth <= tree.count:
        return f"{tree.path}.{depth - 1}"
    return "head"


def reinit_top_layers(model: PreTrainedModel, count: int, seed: int) -> list[str]:
    """Re-initialise the top `count` encoder layers (and the pooler, where the family has one) with the model's own
    initialiser, drawn from `seed`; the global random state is left as it was, so nothing else changes.

    Returns the re-initialised modules' paths. `count` above the model's layers is one line (exit 2).
    """
    if count == 0:
        return []
    tree = layer_tree(model, f"--reinit_top_layers {count}")
    if count > tree.count:
        raise UsageError(
            f"--reinit_top_layers {count}: out of range, expected <= {tree.count} (the encoder layers of this model)"
        )
    chosen = [(f"{tree.path}.{index}", tree.layers[index]) for index in range(tree.count - count, tree.count)]
    if tree.pooler is not None:
        chosen.append((tree.pooler_path, tree.pooler))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for _, module in chosen:
            for each in module.modules():
                # transformers' initialisers skip what is marked initialised, as everything loaded from a checkpoint is.
                with _unmarked(each):
                    model._init_weights(each)
    return [path for path, _ in chosen]


@contextlib.contextmanager
def _unmarked(module: nn.Module) -> Iterator[None]:
    tensors = [module, *module.parameters(recurse=False), *module.buffers(recurse=False)]
    marked = [tensor for tensor in tensors if getattr(tensor, "_is_hf_initialized", False)]
    for tensor in marked:
        tensor._is_hf_initialized = False
    try:
        yield
    finally:
        for tensor in marked:
            tensor._is_hf_initialized = True
