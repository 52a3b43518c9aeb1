"""The recipe's memory budget, checked before anything expensive starts.

The estimate counts what a run holds at once: the data splits in memory, the model copies a run keeps
(current, baseline for gates and teachers, one scratch copy), and each quantization stage's cache of
layer inputs and targets (its `cache_mb`, which the pass never exceeds: it subsamples instead).
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset

from compress.batches import collate_items, leaves
from compress.data import DataSplits
from compress.errors import BadInput
from compress.recipe import Recipe

MODEL_COPIES = 3
MB = 1024**2


def dataset_bytes(dataset: Dataset) -> int:
    if len(dataset) == 0:
        return 0
    one = collate_items([dataset[0]])
    return len(dataset) * sum(t.numel() * t.element_size() for _, t in leaves(one))


def estimate_mb(recipe: Recipe, data: DataSplits, model: nn.Module) -> dict[str, float]:
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    caches = sum(getattr(config, "cache_mb", 0) for config in recipe.pass_configs())
    parts = {
        "data": sum(dataset_bytes(split) for split in (data.train, data.val, data.test)) / MB,
        "model copies": MODEL_COPIES * model_bytes / MB,
        "calibration caches": float(caches),
    }
    parts["total"] = sum(parts.values())
    return parts


def check_memory_budget(recipe: Recipe, data: DataSplits, model: nn.Module) -> dict[str, Any]:
    parts = estimate_mb(recipe, data, model)
    budget = recipe.resources.memory_mb
    if budget is not None and parts["total"] > budget:
        detail = ", ".join(f"{k} {v:.0f} MB" for k, v in parts.items() if k != "total")
        raise BadInput(
            f"resources.memory_mb: this run needs about {parts['total']:.0f} MB ({detail}), more than the "
            f"budget of {budget} MB; raise the budget or lower the stages' cache_mb"
        )
    return {"estimate_mb": parts, "budget_mb": budget}
