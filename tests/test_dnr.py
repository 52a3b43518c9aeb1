"""The dead-neuron rate counts exactly the zero outputs of every ReLU module over the data."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress.dnr import dead_neuron_rate


def test_dnr_is_the_share_of_zero_relu_outputs() -> None:
    linear = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        # inputs are positive: units 0 and 1 always fire, unit 2 never does, unit 3 only for x0 > x1
        linear.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, -1.0], [1.0, -1.0]]))
    model = nn.Sequential(linear, nn.ReLU(), nn.Linear(4, 3), nn.ReLU6())
    x = torch.tensor([[2.0, 1.0], [1.0, 2.0], [3.0, 1.0], [1.0, 3.0]])
    result = dead_neuron_rate(model, TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=3)
    assert result["per_layer"]["1"] == (4 + 2) / 16
    assert result["relu_modules"] == 2
    second = result["per_layer"]["3"]
    assert result["dnr"] == (6 + second * 12) / 28
    assert not model[1]._forward_hooks  # hooks are removed afterwards


def test_dnr_is_none_without_relu_modules() -> None:
    data = TensorDataset(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
    assert dead_neuron_rate(nn.Linear(2, 2), data)["dnr"] is None
