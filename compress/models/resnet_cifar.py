"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of widths w, 2w, 4w.

Every activation is its own nn.ReLU module (never shared, never F.relu) so that passes can hook each
one; the residual add is a plain `out + identity` so that tracers and Torch-Pruning see it. ReLUs
are not in-place, so a hook that keeps a module's input sees the value before the activation.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.models.registry import register_builtin

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels; adds no parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_front, self.pad_back = extra // 2, extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


def _shortcut(in_planes: int, planes: int, stride: int, kind: Shortcut) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_planes, planes, stride)
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: Shortcut) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNetCifar(nn.Module):
    def __init__(
        self,
        blocks_per_stage: int,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        shortcut: Shortcut = "B",
        input_size: int = 32,
    ) -> None:
        super().__init__()
        _check_args(blocks_per_stage, in_channels, num_classes, width, shortcut)
        self.input_size = input_size
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = width
        stages = []
        for stage, stride in enumerate((1, 2, 2)):
            out_planes = width * 2**stage
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(planes, out_planes, stride if index == 0 else 1, shortcut))
                planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _check_args(n: int, in_channels: int, num_classes: int, width: int, shortcut: str) -> None:
    # ValueError reaches the user as `model.kwargs: ...`, so name the kwarg.
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n < 1:
        raise ValueError(f"blocks per stage must be >= 1, got {n}")


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_builtin("resnet8")
def resnet8(**kwargs) -> ResNetCifar:
    return ResNetCifar(1, **kwargs)


@register_builtin("resnet20")
def resnet20(**kwargs) -> ResNetCifar:
    return ResNetCifar(3, **kwargs)


@register_builtin("resnet32")
def resnet32(**kwargs) -> ResNetCifar:
    return ResNetCifar(5, **kwargs)
