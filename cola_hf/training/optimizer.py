"""Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020): the optimizer's parameter groups, one per depth.

The classification head (and pooler) trains at the recipe's rate; each encoder layer below it at the rate times one
more power of the decay; the embeddings lowest: with n layers, a parameter at depth k (training/layers.py) gets
`learning_rate * decay ** (n + 1 - k)`. Weight decay is split exactly as the Trainer splits it (its own
`get_decay_parameter_names`: no decay on biases and norms). Each group carries its `layer` and `param_names`,
so the optimizer itself says which rate each parameter got. The schedule scales every group's rate by the same factor
(LambdaLR keeps each group's initial rate), so the ratios hold over the whole run.

With decay 1.0 this module is not used at all: the Trainer's own optimizer is the tutorial's (test_exactness.py).
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, Trainer

from cola_hf.training.layers import depth_name, layer_tree, parameter_depths

logger = logging.getLogger(__name__)


def layerwise_parameter_groups(
    model: PreTrainedModel, learning_rate: float, decay: float, weight_decay: float, decay_parameters: set[str]
) -> list[dict]:
    """The optimizer's groups: one per (depth, weight decay or not), each with its `lr`, `layer` and
    (name, parameter) pairs."""
    tree = layer_tree(model, f"--layerwise_lr_decay {decay:g}")
    depths = parameter_depths(model, tree)
    top = tree.count + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth, decays = depths[name], name in decay_parameters
        group = groups.setdefault(
            (depth, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr": learning_rate * decay ** (top - depth),
                "layer": depth_name(depth, tree),
            },
        )
        # (name, tensor): torch keeps the names as the group's `param_names`, in the optimizer's state too.
        group["params"].append((name, parameter))
    # Head first: the Trainer logs the first group's rate as the run's learning_rate.
    return [groups[key] for key in sorted(groups, reverse=True)]


def create_layerwise_optimizer(trainer: Trainer, model: PreTrainedModel) -> torch.optim.Optimizer:
    """The Trainer's optimizer class and settings (`--optim`, betas, epsilon) over the layer-wise groups."""
    args = trainer.args
    groups = layerwise_parameter_groups(
        model,
        args.learning_rate,
        args.layerwise_lr_decay,
        args.weight_decay,
        set(trainer.get_decay_parameter_names(model)),
    )
    optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs.pop("lr", None)  # each group has its own
    logger.info(
        "Layer-wise learning rates (decay %g):\n%s",
        args.layerwise_lr_decay,
        "\n".join(
            f"  {group['layer']:<28} lr {group['lr']:.3g}  weight decay {group['weight_decay']:g}  "
            f"{len(group['params'])} tensors"
            for group in groups
        ),
    )
    return optimizer_cls(groups, **optimizer_kwargs)
