"""Fixtures for calling a pass directly, without a run: a StageContext over small random data."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress.data import DataSplits
from compress.progress import RunProgress
from compress.state import StageContext
from compress.train import predict


def _top1(model: nn.Module, dataset: TensorDataset) -> float:
    logits, labels = predict(model, dataset)
    return float((logits.argmax(1) == labels).float().mean())


def context_for(data: DataSplits, *, seed: int = 0, batch_size: int = 64, name: str = "stage") -> StageContext:
    return StageContext(
        data=data,
        device=torch.device("cpu"),
        seed=seed,
        batch_size=batch_size,
        progress=RunProgress(quiet=True),
        evaluate=lambda model: _top1(model, data.val),
        stage_name=name,
    )


@pytest.fixture
def random_context() -> Callable[..., StageContext]:
    """A context over random images of a given shape: for structure tests that need no learning."""

    def make(shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10, samples: int = 16) -> StageContext:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(samples, *shape, generator=generator)
        y = torch.randint(0, num_classes, (samples,), generator=generator)
        dataset = TensorDataset(x, y)
        splits = DataSplits(dataset, dataset, dataset, num_classes=num_classes, input_shape=shape, name="random")
        return context_for(splits, batch_size=8)

    return make
