"""Samples, targets and model outputs of any structure: one tensor, or tuples/lists/dicts of them.

The contract (../shared/DESIGN.md, "Any model, any task"): a dataset item is `(sample, target)`, or
`(sample,)` / a bare sample when unlabelled; a sample is a tensor (`model(x)`), a tuple/list of tensors
(`model(*x)`) or a dict of them (`model(**x)`). Batches are torch's default collate of items. Outputs
may be a tensor, a tuple, a dict or a `transformers` ModelOutput (a dict underneath); `model.output`
picks the part that metrics, gates and distillation read.

Everything here walks such structures and nothing else: no pass needs to know which structure a task has.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from compress.errors import BadInput

Nested = Any  # Tensor | tuple | list | dict (ModelOutput included) of Nested


# --- walking structures ---------------------------------------------------------------------------


def map_tensors(obj: Nested, fn: Callable[[Tensor], Any]) -> Nested:
    """`obj` with `fn` applied to every tensor; dicts (ModelOutput included) come back as plain dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items() if v is not None}
    if isinstance(obj, (tuple, list)):
        mapped = [map_tensors(v, fn) for v in obj]
        return tuple(mapped) if isinstance(obj, tuple) else mapped
    return obj


def leaves(obj: Nested, prefix: str = "") -> list[tuple[str, Tensor]]:
    """(name, tensor) for every tensor, in order: '' for a lone tensor, '0', '1' for tuple positions,
    keys for dicts, joined by '.' when nested ('out', 'boxes.0')."""
    if isinstance(obj, Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        items: Sequence[tuple[Any, Any]] = list(obj.items())
    elif isinstance(obj, (tuple, list)):
        items = list(enumerate(obj))
    else:
        return []
    found: list[tuple[str, Tensor]] = []
    for key, value in items:
        found += leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def to_device(obj: Nested, device: torch.device | str) -> Nested:
    return map_tensors(obj, lambda t: t.to(device))


def batch_len(obj: Nested) -> int:
    """The batch size of a collated structure (its first tensor's first axis)."""
    found = leaves(obj)
    if not found or found[0][1].dim() == 0:
        raise ValueError("batch_len: no batched tensor in the structure")
    return int(found[0][1].shape[0])


def slice_batch(obj: Nested, start: int, stop: int) -> Nested:
    return map_tensors(obj, lambda t: t[start:stop])


def index_batch(obj: Nested, index: Tensor) -> Nested:
    return map_tensors(obj, lambda t: t[index])


def concat(batches: Sequence[Nested]) -> Nested:
    """Batches of one structure joined along the batch axis."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    if isinstance(first, Mapping):
        return {k: concat([b[k] for b in batches]) for k in first if first[k] is not None}
    if isinstance(first, (tuple, list)):
        joined = [concat([b[i] for b in batches]) for i in range(len(first))]
        return tuple(joined) if isinstance(first, tuple) else joined
    return first


def structure_text(obj: Nested) -> str:
    """What a structure holds, for messages: 'tensor [8, 384]', 'dict out [8, 21, 64, 64], aux [...]'."""
    found = leaves(obj)
    if isinstance(obj, Tensor):
        return f"tensor {list(obj.shape)}"
    kind = "dict" if isinstance(obj, Mapping) else type(obj).__name__
    return f"{kind} " + ", ".join(f"{name} {list(t.shape)}" for name, t in found)


# --- samples and targets ----------------------------------------------------------------------------


def split_item(item: Any) -> tuple[Nested, Any]:
    """(sample, target) of one dataset item; target None when unlabelled."""
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return item[0], item[1]
        if len(item) == 1:
            return item[0], None
        raise BadInput(
            f"data: a dataset item must be (sample, target) or (sample,), got a {type(item).__name__} of "
            f"{len(item)} elements (wrap several model inputs in one tuple or dict: ((ids, mask), target))"
        )
    return item, None


def collate_items(items: Sequence[Any]) -> tuple[Nested, Any]:
    """torch's default collate of dataset items, as (samples, targets or None)."""
    pairs = [split_item(item) for item in items]
    samples = default_collate([s for s, _ in pairs])
    targets = [t for _, t in pairs]
    if all(t is None for t in targets):
        return samples, None
    if any(t is None for t in targets):
        raise BadInput("data: some dataset items have a target and some do not")
    return samples, default_collate(targets)


def iterate(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> Iterator[tuple[Nested, Any]]:
    """Batches (samples, targets or None) of `dataset`; with `shuffle`, the order depends on `seed` alone."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    loader = DataLoader(
        dataset, batch_size, shuffle=shuffle, generator=generator, num_workers=0, drop_last=drop_last,
        collate_fn=collate_items,
    )  # fmt: skip
    yield from loader


def batch_loader(dataset: Dataset, batch_sampler: Sequence[Sequence[int]]) -> DataLoader:
    """Batches holding exactly the given index lists, in order, collated as (samples, targets or None)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=0, collate_fn=collate_items)


def example_input(dataset: Dataset, device: torch.device | str = "cpu") -> Nested:
    """A batch of one: the dataset's first sample, collated (what tracing and export take)."""
    sample, _ = collate_items([dataset[0]])
    return to_device(sample, device)


def stack_samples(dataset: Dataset) -> Nested:
    """Every sample of a dataset collated into one batch (calibration sets, ONNX Runtime inputs)."""
    samples, _ = collate_items([dataset[i] for i in range(len(dataset))])
    return samples


def call_model(model: nn.Module, sample: Nested) -> Any:
    """model(x), model(*x) or model(**x) for a tensor, a tuple/list or a dict sample."""
    if isinstance(sample, Mapping):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


def as_args(sample: Nested) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) that `call_model` passes: what torch.onnx.export, torch.export and fx need."""
    if isinstance(sample, Mapping):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


def is_class_targets(targets: Any) -> bool:
    """Integer class indices, one per sample (what a per-class split and top-1 read)."""
    return isinstance(targets, Tensor) and targets.dim() == 1 and not (
        targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool
    )


# --- outputs ---------------------------------------------------------------------------------------


def flat_outputs(outputs: Nested) -> dict[str, Tensor]:
    """Every output tensor by its name (`leaves`); exported ONNX files carry them in this order."""
    return dict(leaves(outputs))


def select(flat: Mapping[str, Tensor], key: str | None) -> Nested:
    """What metrics, gates and distillation read: the outputs under `model.output` ('out', 'logits',
    '0'; all when None), one tensor as a tensor, several as a dict by name. A name that is not there is
    one line listing what is."""
    chosen = dict(flat) if key is None else {k: v for k, v in flat.items() if k == key or k.startswith(f"{key}.")}
    if not chosen:
        found = ", ".join(k or "(one tensor)" for k in flat) or "none"
        raise BadInput(f"model.output: {key!r} is not among the model's outputs (found: {found})")
    return next(iter(chosen.values())) if len(chosen) == 1 else chosen


def selected(outputs: Nested, key: str | None) -> Nested:
    """What `model.output` names in a model's (nested) outputs; with no key, the outputs as the model
    gives them (a user's metric or loss reads them so; the builtin ones walk any structure)."""
    return outputs if key is None else select(flat_outputs(outputs), key)


def restructure(values: Sequence[Any], template: Nested) -> Nested:
    """`template`'s structure with its tensors replaced, in `leaves` order, by `values` (an exported
    file's outputs, say, put back into the shape the torch model returns)."""
    given = iter(values)
    return map_tensors(template, lambda _: next(given))


def detach_float_cpu(outputs: Nested) -> Nested:
    """Outputs as a run keeps them: detached, on the CPU, floating point ones in float32."""
    return map_tensors(outputs, lambda t: (t.float() if t.is_floating_point() else t).detach().cpu())
