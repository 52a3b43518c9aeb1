"""Samples, targets and outputs of any structure: collate, call, flatten, select."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress.batches import call_model, collate_items, concat, flat_outputs, iterate, select, slice_batch, stack_samples
from compress.errors import BadInput


class TwoInputs(nn.Module):
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": ids.float() * mask, "pair": (ids, mask)}


def test_items_with_and_without_targets() -> None:
    samples, targets = collate_items([(torch.zeros(3), 1), (torch.ones(3), 2)])
    assert samples.shape == (2, 3) and targets.tolist() == [1, 2]
    samples, targets = collate_items([(torch.zeros(3),), (torch.ones(3),)])
    assert samples.shape == (2, 3) and targets is None
    with pytest.raises(BadInput, match="some dataset items have a target"):
        collate_items([(torch.zeros(3), 1), (torch.ones(3),)])
    with pytest.raises(BadInput, match=r"\(sample, target\) or \(sample,\)"):
        collate_items([(torch.zeros(3), 1, 2)])


def test_dict_and_tuple_samples_call_the_model_by_keyword_and_position() -> None:
    ids, mask = torch.arange(4), torch.ones(4)
    by_name = call_model(TwoInputs(), {"ids": ids, "mask": mask})
    by_position = call_model(TwoInputs(), (ids, mask))
    assert torch.equal(by_name["sum"], by_position["sum"])


def test_outputs_flatten_by_name_and_select() -> None:
    outputs = TwoInputs()(torch.arange(4), torch.ones(4))
    flat = flat_outputs(outputs)
    assert list(flat) == ["sum", "pair.0", "pair.1"]
    assert torch.equal(select(flat, "sum"), outputs["sum"])
    assert set(select(flat, "pair")) == {"pair.0", "pair.1"}
    assert len(select(flat, None)) == 3
    with pytest.raises(BadInput, match=r"model.output: 'logits' is not among the model's outputs \(found: sum, pair.0, pair.1\)"):
        select(flat, "logits")


def test_batches_of_int64_dict_samples_round_trip() -> None:
    data = [({"ids": torch.arange(i, i + 5), "mask": torch.ones(5)},) for i in range(10)]
    batches = list(iterate(data, 4))
    assert [len(b[0]["ids"]) for b in batches] == [4, 4, 2] and batches[0][1] is None
    assert batches[0][0]["ids"].dtype == torch.int64
    whole = stack_samples(data)
    assert torch.equal(concat([b[0] for b in batches])["ids"], whole["ids"])
    assert torch.equal(slice_batch(whole, 2, 3)["ids"][0], torch.arange(2, 7))


def test_tensor_dataset_items_keep_working() -> None:
    dataset = TensorDataset(torch.randn(6, 1, 4, 4), torch.arange(6))
    samples, targets = next(iter(iterate(dataset, 6)))
    assert samples.shape == (6, 1, 4, 4) and targets.tolist() == list(range(6))
