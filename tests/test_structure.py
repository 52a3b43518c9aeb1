"""A structure record is plain data and resizes a freshly built model to a channel-pruned one."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from compress.structure import apply_structure, structure_record


def _net(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.GroupNorm(2, hidden), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(hidden), nn.Linear(hidden, 5),
    )


def test_record_round_trips_through_weights_only_and_resizes_a_fresh_model() -> None:
    torch.manual_seed(0)
    small = _net(4).eval()
    payload = {"structure": structure_record(small), "state_dict": small.state_dict()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["structure"]["3"] == {"in_channels": 4, "out_channels": 4, "groups": 4}
    assert loaded["structure"]["8"] == {"normalized_shape": [4]}

    fresh = _net(16)
    apply_structure(fresh, loaded["structure"], loaded["state_dict"])
    fresh.load_state_dict(loaded["state_dict"])
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh.eval()(x), small(x))
    assert fresh[1].num_features == 4 and fresh[8].normalized_shape == (4,)


def test_record_naming_unknown_modules_is_refused() -> None:
    with pytest.raises(ValueError, match="does not have"):
        apply_structure(_net(4), {"head.fc": {"in_features": 3}}, {})
