"""Fixtures for calling a pass directly, without a run: a StageContext over small random data."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.data import TensorDataset

from compress.data import DataSplits
from compress.state import StageContext


@pytest.fixture
def random_context() -> Callable[..., StageContext]:
    """A context over random images of a given shape: for structure tests that need no learning."""

    def make(shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10, samples: int = 16) -> StageContext:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(samples, *shape, generator=generator)
        y = torch.randint(0, num_classes, (samples,), generator=generator)
        dataset = TensorDataset(x, y)
        splits = DataSplits(dataset, dataset, dataset, num_classes=num_classes, input_shape=shape, name="random")
        return StageContext.standalone(splits, batch_size=8)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models and small batches, restored afterwards: a second
    OpenMP thread only adds spin-waiting there, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
