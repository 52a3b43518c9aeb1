"""Helpers shared by the bench scripts: the cached reference models, test accuracy, a pass context."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.data import DataSplits, load_data  # noqa: E402
from compress.metrics import resolve_metric  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress.progress import RunProgress  # noqa: E402
from compress.recipe import Recipe, load_recipe  # noqa: E402
from compress.reference import obtain_reference  # noqa: E402
from compress.train import predict  # noqa: E402

TOP1 = resolve_metric("top1")
DEMO_RECIPE = ROOT / "recipes" / "mnist-resnet20.yaml"


def reference(arch: str = "resnet20") -> tuple[nn.Module, DataSplits, Recipe]:
    """The demo recipe's reference (trained with its settings, cached in ~/.cache/compress), for `arch`."""
    recipe = load_recipe(DEMO_RECIPE)
    if arch != "resnet20":
        model_cfg = recipe.model.model_copy(update={"arch": f"builtin:{arch}"})
        recipe = recipe.model_copy(update={"name": f"mnist-{arch}", "model": model_cfg})
    data = load_data(recipe.data)
    channels, size, _ = data.input_shape
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, in_channels=channels, num_classes=data.num_classes, input_size=size)
    obtain_reference(model, recipe, data, torch.device("cpu"), RunProgress())
    return model.eval(), data, recipe


def test_top1(model: nn.Module, data: DataSplits) -> float:
    return float(TOP1(*predict(model, data.test)))
