"""`compress validate`: the schema plus every reference the recipe makes, without running anything."""
from __future__ import annotations

from pathlib import Path

from compress.errors import BadInput
from compress.recipe import Recipe, load_recipe


def validate_recipe(path: str | Path) -> Recipe:
    from compress.data import check_dataset
    from compress.metrics import resolve_metric
    from compress.models import check_arch
    from compress.passes.registry import check_stages

    recipe = load_recipe(path)
    check_arch(recipe.model.arch)
    checkpoint = recipe.model.checkpoint
    if checkpoint and not Path(checkpoint).is_file():
        raise BadInput(f"{path}: model.checkpoint: file not found: {checkpoint}")
    check_dataset(recipe.data.dataset)
    resolve_metric(recipe.metric)
    check_stages(recipe, path)
    return recipe
