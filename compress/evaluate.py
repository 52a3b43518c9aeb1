"""`compress eval`: the recipe's metric for a checkpoint or an exported ONNX file."""
from __future__ import annotations

from pathlib import Path

import torch

from compress.errors import BadInput


def evaluate_file(model_path: Path, recipe_path: Path, *, split: str = "test", trust: bool = False) -> float:
    from compress.data import dataset_tensors, load_data
    from compress.metrics import resolve_metric
    from compress.models import build_model, load_checkpoint
    from compress.recipe import load_recipe
    from compress.train import predict

    if split not in ("val", "test"):
        raise BadInput(f"--split: expected val or test, got {split!r}")
    if not model_path.is_file():
        raise BadInput(f"{model_path}: file not found")
    recipe = load_recipe(recipe_path)
    data = load_data(recipe.data)
    metric = resolve_metric(recipe.metric)
    dataset = getattr(data, split)
    if model_path.suffix == ".onnx":
        from export.ort_runner import ort_session, predict as ort_predict

        inputs, labels = dataset_tensors(dataset)
        try:
            session = ort_session(model_path)
        except Exception as exc:
            raise BadInput(f"{model_path}: not a loadable ONNX model ({type(exc).__name__})") from None
        return float(metric(torch.from_numpy(ort_predict(session, inputs.numpy())), labels))
    channels, height, _ = data.input_shape
    model = build_model(recipe.model, in_channels=channels, num_classes=data.num_classes, input_size=height)
    model = load_checkpoint(model, model_path, trust=trust)
    return float(metric(*predict(model, dataset)))
