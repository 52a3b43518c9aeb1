import pytest
import torch
from torch import nn

from compress.models import get_builtin
from compress.models.resnet_cifar import PadShortcut


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "shortcut", "in_channels", "expected"),
    [
        # 272,186 is ResNet-20 on MNIST with 1x1 projection shortcuts (option B) ...
        ("resnet20", "B", 1, 272_186),
        # ... the paper's parameter-free option A has no projections: 272,186 - 2*(conv+BN) = 269,434,
        ("resnet20", "A", 1, 269_434),
        # and on CIFAR (3 channels) 269,722, the figure of the widely used akamaster/pytorch_resnet_cifar10.
        ("resnet20", "A", 3, 269_722),
        ("resnet8", "B", 3, 78_042),
        ("resnet32", "A", 3, 464_154),
    ],
)
def test_parameter_counts(name, shortcut, in_channels, expected):
    model = get_builtin(name)(in_channels=in_channels, num_classes=10, shortcut=shortcut)
    assert n_params(model) == expected


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("size", [28, 8, 32])
def test_forward_shapes(shortcut, size):
    model = get_builtin("resnet8")(in_channels=1, num_classes=7, shortcut=shortcut).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_structure_for_later_passes():
    model = get_builtin("resnet20")(input_size=28)
    assert model.input_size == 28
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9 and len({id(r) for r in relus}) == len(relus)
    assert not any(r.inplace for r in relus)
    assert isinstance(model.layer2[0].shortcut, nn.Sequential)
    assert isinstance(get_builtin("resnet20")(shortcut="A").layer2[0].shortcut, PadShortcut)


def test_width_scales_channels():
    model = get_builtin("resnet8")(width=8, num_classes=4)
    assert model.conv1.out_channels == 8 and model.fc.in_features == 32


def test_bad_kwargs():
    with pytest.raises(ValueError, match="shortcut must be 'A' or 'B'"):
        get_builtin("resnet8")(shortcut="C")
    with pytest.raises(TypeError):
        get_builtin("resnet8")(depth=20)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(1, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_mobilenet():
    build = get_builtin("mobilenet")
    model = build(in_channels=1, num_classes=10, input_size=28).eval()
    assert isinstance(model.classifier, nn.Linear) and model.input_size == 28
    blocks = [m for m in model.modules() if type(m).__name__ == "InvertedResidual"]
    assert len(blocks) == 8 and sum(b.use_residual for b in blocks) == 3
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 8 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert n_params(build(width_mult=0.5)) < n_params(build())
