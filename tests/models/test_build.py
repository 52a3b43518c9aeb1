import textwrap

import pytest
import torch
from torch import nn

from compress.errors import BadInput
from compress.models import build_model, check_arch
from compress.recipe import ModelConfig

SIZES = dict(in_channels=1, num_classes=10, input_size=28)


def build(arch: str, **kwargs) -> nn.Module:
    return build_model(ModelConfig(arch=arch, kwargs=kwargs), **SIZES)


def test_builtin_takes_sizes_from_data_unless_kwargs_say_otherwise():
    model = build("builtin:resnet8")
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10 and model.input_size == 28
    model = build("builtin:resnet8", num_classes=4, width=8, shortcut="A")
    assert model.fc.out_features == 4 and model.conv1.out_channels == 8
    assert build("builtin:mobilenet", width_mult=0.5).classifier.out_features == 10


def test_builtin_errors():
    with pytest.raises(BadInput, match=r"^model.arch: unknown builtin 'resnet21' \(known: mobilenet, resnet20, resnet32, resnet8, transformer\)$"):
        build("builtin:resnet21")
    with pytest.raises(BadInput, match="^model.kwargs: builtin:resnet8: .*unexpected keyword argument 'depth'"):
        build("builtin:resnet8", depth=3)
    with pytest.raises(BadInput, match="^model.kwargs: builtin:resnet8: shortcut must be 'A' or 'B'"):
        build("builtin:resnet8", shortcut="C")


def test_torchvision_model():
    model = build_model(ModelConfig(arch="torchvision:resnet18"), in_channels=3, num_classes=7, input_size=32)
    assert model.fc.out_features == 7
    model = build_model(
        ModelConfig(arch="torchvision:resnet18", kwargs={"num_classes": 5}), in_channels=3, num_classes=7, input_size=32
    )
    assert model.fc.out_features == 5


def test_torchvision_refuses_downloads_and_wrong_channels():
    with pytest.raises(BadInput, match="^model.kwargs: 'weights' is not allowed"):
        build("torchvision:resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(BadInput, match="^model.kwargs: 'pretrained' is not allowed"):
        build("torchvision:resnet18", pretrained=True)
    with pytest.raises(BadInput, match="expects 3-channel images, the dataset has 1"):
        build("torchvision:resnet18")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(hidden=8, classes=10):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, classes))

            def not_a_model():
                return 42

            NOT_CALLABLE = 3
            """
        )
    )
    (tmp_path / "broken_nets.py").write_text("import definitely_not_installed_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_python_source(user_module):
    model = build("python:my_nets:tiny", hidden=4, classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(BadInput, match="^model.kwargs: python:my_nets:tiny: .*unexpected keyword argument 'width'"):
        build("python:my_nets:tiny", width=3)
    with pytest.raises(BadInput, match="returned a int, expected a torch.nn.Module"):
        build("python:my_nets:not_a_model")


def test_python_source_from_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_nets.py").write_text("from torch import nn\ndef net():\n    return nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    assert isinstance(build("python:cwd_nets:net"), nn.Linear)


def test_check_arch_accepts_good_references(user_module):
    for arch in ("builtin:resnet20", "builtin:mobilenet", "torchvision:mobilenet_v2", "python:my_nets:tiny"):
        check_arch(arch)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("builtin:resnet21", r"^model.arch: unknown builtin 'resnet21' \(known: mobilenet, resnet20, "),
        ("torchvision:resnet181", r"^model.arch: unknown torchvision model 'resnet181' \(did you mean resnet18"),
        ("python:no_such_module_xyz:net", r"^model.arch: cannot import module 'no_such_module_xyz' \(ModuleNotFoundError: "),
        ("python:broken_nets:net", r"^model.arch: cannot import module 'broken_nets' \(ModuleNotFoundError: .*definitely_not_installed_pkg"),
        ("python:my_nets:bar", r"^model.arch: module 'my_nets' has no callable 'bar'$"),
        ("python:my_nets:NOT_CALLABLE", r"^model.arch: module 'my_nets' has no callable 'NOT_CALLABLE'$"),
        ("python:my_nets", r"^model.arch: expected python:module:callable, got 'python:my_nets'$"),
    ],
)
def test_check_arch_messages(user_module, arch, message):
    with pytest.raises(BadInput, match=message):
        check_arch(arch)


def test_missing_optional_dependency_is_bad_input():
    from compress.models.pyref import require

    with pytest.raises(BadInput, match=r"^model.arch: torchvision:x needs not_installed_xyz, which is not installed \(pip install 'compress\[vision\]'"):
        require("not_installed_xyz.models", "vision", "model.arch", "torchvision:x")
