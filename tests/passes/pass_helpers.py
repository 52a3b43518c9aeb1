"""Calling a pass directly on a model of any task: a standalone StageContext over given dataset items,
scored by a named metric (against the model as given, for a fidelity metric), with a copy of the model
as the baseline. Imported by the pass tests (tests/passes is put on sys.path by the importing module)."""
from __future__ import annotations

import copy

from torch import nn
from torch.utils.data import Dataset

from compress.data import DataSplits
from compress.metrics import resolve_metric
from compress.state import ModelState, StageContext
from compress.train import predict


class Items(Dataset):
    """Dataset items as given: (sample, target) or (sample,)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def any_context(model: nn.Module, items: list, metric: str, targets: str, samples_shape=None) -> StageContext:
    """A standalone context whose metric is `metric` (against the model as given, when a fidelity
    metric) and whose baseline is a copy of the model."""
    dataset = Items(items)
    splits = DataSplits(
        dataset, dataset, dataset, num_classes=None, input_shape=samples_shape, name="any", targets=targets, split="random"
    )  # fmt: skip
    ctx = StageContext.standalone(splits, batch_size=8)
    chosen = resolve_metric(metric)
    reference = predict(model, dataset)[0] if chosen.against_reference else None

    def score_and_outputs(m: nn.Module):
        outputs, labels = predict(m, dataset)
        return chosen(outputs, labels, reference), outputs

    ctx.metric = chosen
    ctx.score_and_outputs = score_and_outputs
    ctx.evaluate = lambda m: score_and_outputs(m)[0]
    ctx.baseline = ModelState(copy.deepcopy(model).eval())
    return ctx


def run_pass(spec, model: nn.Module, ctx: StageContext, **params):
    """The pass `spec` (compress.passes.get_pass) applied to `model` as a run applies it: (state, info)."""
    result = spec.apply(ModelState(model), spec.config_type.model_validate(params), ctx)
    return result.state, result.info
