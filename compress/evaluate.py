"""`compress eval`: the recipe's metric for a checkpoint or an exported ONNX file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.batches import selected
from compress.errors import BadInput


def evaluate_file(model_path: Path, recipe_path: Path, *, split: str = "test", trust: bool = False) -> float:
    from compress.data import load_data
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
        return _evaluate_onnx(model_path, dataset, metric, recipe.model.output)
    channels, height, _ = data.input_shape or (None, None, None)

    def build() -> torch.nn.Module:
        return build_model(recipe.model, in_channels=channels, num_classes=data.num_classes, input_size=height)

    model = load_checkpoint(build(), model_path, trust=trust)
    outputs, targets = predict(model, dataset)
    reference = None
    if metric.against_reference:
        reference = selected(predict(_uncompressed(recipe, data, build, trust), dataset)[0], recipe.model.output)
    return float(metric(selected(outputs, recipe.model.output), targets, reference))


def _uncompressed(recipe: Any, data: Any, build: Any, trust: bool) -> torch.nn.Module:
    """The model a run starts from, for fidelity metrics: the recipe's checkpoint, the cached reference
    it trained, or (no targets to train on) the model as constructed."""
    from compress.models import load_checkpoint
    from compress.reference import load_cached, reference_key, reference_path

    model = build()
    if recipe.model.checkpoint:
        return load_checkpoint(model, recipe.model.checkpoint, trust=trust, arch=recipe.model.arch)
    if data.targets == "none":
        return model
    path = reference_path(recipe)
    if path.exists() and load_cached(model, path, reference_key(recipe)):
        return model
    raise BadInput(
        f"compress eval: metric {recipe.metric} compares with the uncompressed model, and its reference is not "
        f"trained yet ({path}); run the recipe first"
    )


def _evaluate_onnx(model_path: Path, dataset: Any, metric: Any, output: str | None) -> float:
    """The metric of an ONNX file's outputs on every sample of `dataset` (any structure: the file's inputs
    are fed by name), read as the model's outputs (`model.output` selects among several)."""
    import onnx

    from compress.batches import collate_items, select
    from compress.models.pyref import first_line
    from export.onnx_export import output_leaves
    from export.ort_runner import ort_session, predict_outputs

    if metric.against_reference:
        raise BadInput(
            f"compress eval: metric {metric.name} compares with the uncompressed model, which an ONNX file alone "
            "does not give; evaluate with a metric of the data's targets (top1, top5, miou, python:...) or read "
            "the file's metric from the run's report.json (export.<precision>.metric)"
        )
    try:
        session = ort_session(model_path)
        names = output_leaves(onnx.load(str(model_path), load_external_data=False))
    except Exception as exc:
        raise BadInput(f"{model_path}: not a loadable ONNX model ({type(exc).__name__})") from None
    samples, targets = collate_items([dataset[i] for i in range(len(dataset))])
    try:
        arrays = predict_outputs(session, samples)
    except Exception as exc:  # inputs the file does not take (names, shapes, types): ValueError or ORT's own
        raise BadInput(f"{model_path}: cannot run on the data's samples: {first_line(exc)}") from None
    flat = {name: torch.from_numpy(array) for name, array in zip(names, arrays.values())}
    return float(metric(select(flat, output), targets))
