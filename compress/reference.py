"""The built-in reference model: trained once per settings, cached by a hash of those settings."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.atomic import atomic_torch_save
from compress.batches import split_item
from compress.data import DataSplits
from compress.distributed import barrier, is_main
from compress.losses import Objective, kl, resolve_loss
from compress.progress import RunProgress
from compress.recipe import Recipe, stable_hash
from compress.train import fit

REFERENCE_FORMAT = "compress.reference/1"


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE_DIR") or Path.home() / ".cache" / "compress")


def reference_key(recipe: Recipe) -> str:
    """Everything that changes the trained weights, and nothing else (not the stages, not the export)."""
    return stable_hash(
        {
            "format": REFERENCE_FORMAT,
            "arch": recipe.model.arch,
            "kwargs": recipe.model.kwargs,
            # loss: auto was the only loss before it became a setting: references trained then stay cached
            "train": recipe.model.train.model_dump(exclude={"loss"} if recipe.model.train.loss == "auto" else None),
            "data": recipe.data.model_dump(exclude={"calibration_samples"}),
            "seed": recipe.seed,
        }
    )


def reference_path(recipe: Recipe) -> Path:
    # named by the key alone: recipes that differ only in their stages (the demo, the CI recipes, the
    # benches) share one trained reference
    arch = recipe.model.arch.rsplit(":", 1)[-1]
    return cache_dir() / f"reference-{arch}-{reference_key(recipe)}.pt"


def load_cached(model: nn.Module, path: Path, key: str) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != REFERENCE_FORMAT or payload.get("key") != key:
            return False
        model.load_state_dict(payload["state_dict"])
    except Exception:  # a damaged cache entry is retrained, never trusted
        return False
    return True


def obtain_reference(
    model: nn.Module, recipe: Recipe, data: DataSplits, device: torch.device, progress: RunProgress
) -> dict[str, Any]:
    """Load the cached reference into `model`, or train it and cache it. Returns what the report records."""
    key = reference_key(recipe)
    path = reference_path(recipe)
    if path.exists() and load_cached(model, path, key):
        progress.log(f"reference: reusing cached {path}")
        return {"source": "reference", "cached": True, "path": str(path), "key": key}
    train = recipe.model.train
    progress.log(f"reference: training {recipe.model.arch} for {train.epochs} epochs (cached afterwards)")
    model.to(device)
    _, target = split_item(data.train[0])
    task = resolve_loss(train.loss, target)
    fit(
        model,
        data.train,
        epochs=train.epochs,
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        batch_size=train.batch_size or recipe.data.batch_size,
        schedule=train.schedule,
        shift=train.shift,
        seed=recipe.seed,
        device=device,
        progress=progress,
        description="reference: train",
        objective=Objective(task, kl, recipe.model.output),
    )
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if is_main():  # under torchrun all ranks trained the same model together; one writes it
        atomic_torch_save({"format": REFERENCE_FORMAT, "key": key, "state_dict": state_dict}, path)
    barrier()
    return {"source": "reference", "cached": False, "path": str(path), "key": key}
