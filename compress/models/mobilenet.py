"""A small MobileNetV2 (Sandler et al. 2018) for 28x28 / 32x32 inputs.

The ImageNet network downsamples 32x; here the stem keeps full resolution and only three blocks
stride, so a 28x28 digit still has a 4x4 map before pooling. Eight inverted residual blocks keep it
quick to train on a CPU while still having depthwise convs and residuals for passes to deal with.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from compress.models.registry import register_builtin

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 256


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 (hardware-friendly), never dropping more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, 1))
        layers.append(conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden))
        # Linear bottleneck: no activation after the projection (the paper's point about ReLU
        # destroying information in low-dimensional spaces).
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return out + x if self.use_residual else out


class MobileNetCifar(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 1.0,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        _check_args(in_channels, num_classes, width_mult)
        self.input_size = input_size
        channels = make_divisible(STEM_CHANNELS * width_mult)
        features: list[nn.Module] = [conv_bn_relu6(in_channels, channels, 3)]
        for expansion, out, repeats, stride in BLOCKS:
            out_ch = make_divisible(out * width_mult)
            for index in range(repeats):
                features.append(InvertedResidual(channels, out_ch, stride if index == 0 else 1, expansion))
                channels = out_ch
        last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        features.append(conv_bn_relu6(channels, last, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def _check_args(in_channels: int, num_classes: int, width_mult: float) -> None:
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@register_builtin("mobilenet")
def mobilenet(**kwargs) -> MobileNetCifar:
    return MobileNetCifar(**kwargs)
