"""Dynamic dead-neuron rate (DNR): the share of post-ReLU outputs that are exactly zero over data.

AP (ALGORITHMS.md section 2) argues that harder-pruned ReLU networks have a lower DNR and that lowering
it further helps; any stage can report it. Measured with forward hooks on nn.ReLU / nn.ReLU6 modules,
so activations written as F.relu in forward() are invisible (the builtin nets use modules throughout).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from compress.train import predict

RELU_TYPES = (nn.ReLU, nn.ReLU6)


def dead_neuron_rate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device = torch.device("cpu"),
) -> dict[str, Any]:
    """{"dnr": overall zero share, "per_layer": {relu module: zero share}, "relu_modules": count}.

    `dnr` is None when the model has no ReLU modules to hook.
    """
    counts: dict[str, list[int]] = {}

    def hook(name: str):
        def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            tally = counts.setdefault(name, [0, 0])
            tally[0] += int((output == 0).sum())
            tally[1] += output.numel()

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, RELU_TYPES)
    ]
    try:
        predict(model, dataset, batch_size=batch_size, device=device)
    finally:
        for handle in handles:
            handle.remove()
    zeros = sum(z for z, _ in counts.values())
    total = sum(t for _, t in counts.values())
    return {
        "dnr": zeros / total if total else None,
        "per_layer": {name: z / t for name, (z, t) in counts.items() if t},
        "relu_modules": len(handles),
    }
