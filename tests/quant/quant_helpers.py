"""Helpers for calling the quantization passes directly, without a run (tests/quant puts itself on
sys.path to import them)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from compress.data import DataSplits
from compress.metrics import resolve_metric
from compress.progress import RunProgress
from compress.state import StageContext
from compress.train import predict


def cosine_context(model: nn.Module, dataset: Dataset) -> StageContext:
    """A CPU context over unlabelled data whose metric is the cosine against the float model's outputs."""
    splits = DataSplits(dataset, dataset, dataset, num_classes=None, input_shape=None, name="random")
    metric = resolve_metric("cosine")
    reference, _ = predict(model, dataset)

    def score_and_outputs(m: nn.Module) -> tuple[float, Any]:
        outputs, _ = predict(m, dataset)
        return metric(outputs, None, reference), outputs

    return StageContext(
        data=splits,
        device=torch.device("cpu"),
        seed=0,
        batch_size=8,
        progress=RunProgress(quiet=True),
        evaluate=lambda m: score_and_outputs(m)[0],
        stage_name="quantize",
        calibration_samples=16,
        metric=metric,
        score_and_outputs=score_and_outputs,
    )


class DictSamples(Dataset):
    """Unlabelled items whose sample is a dict of model inputs (the model is called as model(**x)); an input
    given as None is left out of the samples."""

    def __init__(self, **inputs: Tensor | None) -> None:
        self.inputs = {name: tensor for name, tensor in inputs.items() if tensor is not None}

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor]]:
        return ({name: tensor[i] for name, tensor in self.inputs.items()},)
