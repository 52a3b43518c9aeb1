"""Structured channel pruning through Torch-Pruning's DependencyGraph, and MAC counting.

The DependencyGraph couples every layer whose channels must go together (residual adds, concats,
BatchNorm, depthwise convs), so removing a channel keeps the network consistent; the result is a
physically smaller model. See ALGORITHMS.md section 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compress.sparsity import PRUNABLE_TYPES


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on `example` (Torch-Pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs), int(params)


class ChannelPruner:
    """Removes channels by group L2 magnitude, in steps whose cumulative channel ratios are `ratios`.

    Layers outside `selected` keep their output channels (their inputs may still shrink when the layer
    feeding them is pruned); the classifier is always kept, since its outputs are the classes.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        ratios: Sequence[float],
        global_ranking: bool,
        selected: dict[str, nn.Module],
        classifier: str | None,
        round_to: int | None,
    ) -> None:
        import torch_pruning as tp

        ignored = [
            module
            for name, module in model.named_modules()
            if isinstance(module, PRUNABLE_TYPES) and (name not in selected or name == classifier)
        ]
        cumulative = [0.0, *ratios]
        was_training = model.training
        model.eval()  # tracing a batch of one through BatchNorm in train mode can fail
        with torch.enable_grad():  # the graph is built from autograd's record of a forward pass
            self.pruner = tp.pruner.BasePruner(
                model,
                example,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=cumulative[-1],
                global_pruning=global_ranking,
                iterative_steps=len(ratios),
                iterative_pruning_ratio_scheduler=lambda _ratio, _steps: cumulative,
                ignored_layers=ignored,
                round_to=round_to,
            )
        model.train(was_training)
        self.model = model

    def step(self) -> None:
        with torch.enable_grad():
            self.pruner.step()


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels (or features) of every conv/linear layer, to report what shrank."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            counts[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            counts[name] = module.out_features
    return counts


def remap_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Masks of weights whose shape channel pruning changed, rebuilt from the weights' zeros.

    Masked weights are exactly zero, so after Torch-Pruning slices a weight its zeros are the sliced
    mask (an unmasked weight that happens to be exactly 0.0 would become masked: harmless, it is 0).
    """
    params = dict(model.named_parameters())
    remapped = {}
    for key, mask in masks.items():
        weight = params[key]
        remapped[key] = mask if mask.shape == weight.shape else (weight.detach() != 0)
    return remapped
